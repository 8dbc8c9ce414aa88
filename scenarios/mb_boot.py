"""Measured boot: the verifier replays each quote's UEFI event log against PCRs 0-9 and 11-15 and
evaluates the agent's measured-boot policy (the reference state of a known-good boot).

Story (every mb-* scenario): the machine boots a synthetic OVMF + shim + grub + Linux boot with
Secure Boot on (testbed/boot_log.py: S-CRTM, firmware blob, SecureBoot/PK/KEK/db/dbx, boot
variables, shim -> grub -> kernel as EV_EFI_BOOT_SERVICES_APPLICATION, MokList, grub's commands
and kernel command line in PCR 8, grub.cfg/vmlinuz/initrd in PCR 9). The tenant enrols it with the
reference state `keytrio policy create measured-boot` makes from that log (the same document
upstream's `keylime-policy create measured-boot` writes) and three quotes pass. Then the machine
reboots: into the same boot, or into a boot with one tamper knob turned. A tampered log still
replays to the quoted PCRs (the boot really happened that way); the policy refuses it.
"""

from __future__ import annotations

from keytrio.scenarios.mb_support import BOOT_GOOD, GOOD_BOOT, failing, good_policy
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.machine import Machine
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE, Testbed

SECURE_BOOT_DISABLED = "measured_boot.secure_boot_disabled"
APPLICATION_NOT_ALLOWED = "measured_boot.boot_application_not_allowed"
DBX_MISSING = "measured_boot.dbx_missing_entries"
OPTIONS = {"retry_interval": 0.5, "max_retries": 10, "machine_options": BOOT_GOOD}


async def _attested(run: Run, tb: Testbed, m: Machine) -> int:
    async with run.step("the machine booted the good UEFI boot; enrol with its measured-boot reference state"):
        await tb.enrol(m, mb_policy=good_policy(m))
        rec = await tb.wait_count(m, 3)
        run.check(rec["has_mb_refstate"] == 1, "the verifier holds no measured-boot policy")
        run.note("three good quotes with PCRs 0-9, 11-15 replayed and the policy evaluated")
        return int(rec["attestation_count"])


async def _tampered(run: Run, knob: str, event: str, event_type: str) -> None:
    async with run.testbed(machines=1, **OPTIONS) as tb:
        m = tb.machines[0]
        await _attested(run, tb, m)
        async with run.step(f"reboot into a boot with {knob.replace('_', ' ')}: Invalid Quote"):
            await m.reboot(boot=GOOD_BOOT.tampered(knob))
            rec = await tb.wait_state(m, INVALID_QUOTE)
            run.check(rec["last_event_id"] == event, f"event {rec['last_event_id']}, expected {event}")
            run.note(f"event {rec['last_event_id']} (on the {event_type} event)")
            await tb.wait_notices(m, 1)


@scenario("mb-good-boot", expect={"m0": Expect(events=(), notices=(), states=(GET_QUOTE,), final=GET_QUOTE)})
async def mb_good_boot(run: Run) -> None:
    """Measured boot, good boot again: the machine reboots into the same good UEFI boot, and
    attestation continues with the new boot's event log.

    Expected verdict: Get Quote throughout, attestation_count grows past the reboot, no event, no
    notice.
    """
    async with run.testbed(machines=1, **OPTIONS) as tb:
        m = tb.machines[0]
        count = await _attested(run, tb, m)
        async with run.step("reboot into the same good boot: attestation continues"):
            await m.reboot(boot=GOOD_BOOT)
            rec = await tb.wait_count(m, count + 3)
            run.check(rec["last_event_id"] in (None, ""), f"event {rec['last_event_id']}")
            run.note(f"attestation_count {count} -> {rec['attestation_count']}")


@scenario("mb-secure-boot-off", expect=failing(SECURE_BOOT_DISABLED))
async def mb_secure_boot_off(run: Run) -> None:
    """Measured boot, Secure Boot off: the machine reboots with Secure Boot disabled, and the
    verifier fails it on the SecureBoot variable.

    Expected verdict: Get Quote, then Invalid Quote with ``measured_boot.secure_boot_disabled``
    (the SecureBoot EV_EFI_VARIABLE_DRIVER_CONFIG event), and a signed notice about the machine.
    """
    await _tampered(run, "secure_boot_off", SECURE_BOOT_DISABLED, "SecureBoot EV_EFI_VARIABLE_DRIVER_CONFIG")


@scenario("mb-unknown-kernel", expect=failing(APPLICATION_NOT_ALLOWED))
async def mb_unknown_kernel(run: Run) -> None:
    """Measured boot, unknown kernel: the machine reboots into a kernel image that the reference
    state does not list, and the verifier fails it on that boot application.

    Expected verdict: Get Quote, then Invalid Quote with
    ``measured_boot.boot_application_not_allowed`` (the kernel's EV_EFI_BOOT_SERVICES_APPLICATION
    event), and a signed notice about the machine.
    """
    await _tampered(run, "unknown_kernel", APPLICATION_NOT_ALLOWED, "kernel EV_EFI_BOOT_SERVICES_APPLICATION")


@scenario("mb-dbx-missing-entry", expect=failing(DBX_MISSING))
async def mb_dbx_missing_entry(run: Run) -> None:
    """Measured boot, dbx entry removed: the machine reboots with one revoked hash missing from
    the UEFI forbidden-signature database (dbx), and the verifier fails it.

    Expected verdict: Get Quote, then Invalid Quote with ``measured_boot.dbx_missing_entries``
    (the dbx EV_EFI_VARIABLE_DRIVER_CONFIG event), and a signed notice about the machine.
    """
    await _tampered(run, "dbx_missing_entry", DBX_MISSING, "dbx EV_EFI_VARIABLE_DRIVER_CONFIG")


@scenario("mb-extra-application", expect=failing(APPLICATION_NOT_ALLOWED))
async def mb_extra_application(run: Run) -> None:
    """Measured boot, extra boot application: one more EFI application (``bootkit.efi``) runs
    before grub, and the verifier fails the machine on it.

    Expected verdict: Get Quote, then Invalid Quote with
    ``measured_boot.boot_application_not_allowed`` (the extra EV_EFI_BOOT_SERVICES_APPLICATION
    event), and a signed notice about the machine.
    """
    await _tampered(run, "extra_application", APPLICATION_NOT_ALLOWED,
                    "extra EV_EFI_BOOT_SERVICES_APPLICATION")
