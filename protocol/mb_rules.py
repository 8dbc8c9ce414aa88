"""Measured-boot rules: a parsed reference state (:class:`RefState`) against a parsed UEFI event
log, event by event, then the boot as a whole (firmware, boot chain, kernel command line).

The checks follow the meaning of upstream's "example" policy: every event on PCRs 0-9 and 14 must
be of a kind the policy knows; SecureBoot must be as the policy says (and, wanted on, measured);
PK/KEK/db (and vendor_db) hold only allowed keys; dbx holds at least the listed entries (in any of
its signature lists); the PCR 4 boot applications are exactly shim, grub, kernel of one allowed
kernel entry (the kernel may be measured twice), with that entry's initrd (PCR 9) and kernel
command line (PCR 8); S-CRTM and firmware blobs (PCR 0) match one allowed ``scrtm_and_bios``
entry. Each failure is a :class:`~protocol.failures.Failure` ``measured_boot.<what>`` whose
context names the offending event (number, PCR, type). keytrio's extension (boot_applications,
no S-CRTM, pinned events) is described with the format in :mod:`protocol.mb_policy`.

Before any rule reads event data, the data of the PCRs 0-9 and 14 is checked against its digests
(:func:`protocol.eventlog_data.data_mismatch`); data edited after the measurement gives only
``measured_boot.event_data_mismatch`` failures naming the events (upstream reads such data as it
is, so a flipped SecureBoot byte changes its verdict while the PCRs still replay).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keytrio.protocol import eventlog as el
from keytrio.protocol import eventlog_data
from keytrio.protocol.failures import Failure, Severity

POLICY_NAME = "example"  # upstream's policy of this meaning
RELEVANT_PCRS = frozenset([*range(10), 14])  # what the policy looks at
PREFIX = "measured_boot"

_EFI_ACTIONS = {
    1: {"Entering ROM Based Setup"},
    4: {"Calling EFI Application from Boot Option", "Returning from EFI Application from Boot Option"},
    5: {"Exit Boot Services Invocation", "Exit Boot Services Returned with Failure",
        "Exit Boot Services Returned with Success"},
    6: {"UEFI Debug Mode"},
}  # fmt: skip
_BOOT_VAR = re.compile(r"BootOrder|Boot[0-9a-fA-F]+")
_X509_OR_SHA256 = {el.EFI_CERT_X509_GUID, el.EFI_CERT_SHA256_GUID}
#: event types a rule reads the decoded data of: data that does not decode fails them
_DECODED_TYPES = (el.EV_EFI_VARIABLE_DRIVER_CONFIG, el.EV_EFI_VARIABLE_AUTHORITY, el.EV_EFI_VARIABLE_BOOT,
                  el.EV_IPL, el.EV_EFI_BOOT_SERVICES_APPLICATION)  # fmt: skip


@dataclass(frozen=True)
class Kernel:
    """One allowed boot. Upstream's keys fill shim/grub/kernel/vmlinuz/initrd/cmdline (sha256 hex);
    keytrio's extension (module text) fills ``apps`` instead of shim/grub/kernel, and None for
    initrd/cmdline/vmlinuz means "not measured in this boot"."""

    shim: str | None
    grub: str | None
    kernel: str | None  # Authenticode sha256 (Secure Boot)
    vmlinuz: dict[str, str] | None  # plain digest (no Secure Boot)
    initrd: dict[str, str] | None
    cmdline: re.Pattern[str] | None
    apps: list[dict[str, str]] | None = None  # the exact PCR 4 chain (keytrio extension)


@dataclass
class RefState:
    has_secureboot: bool
    scrtm_and_bios: list[tuple[dict[str, str] | None, list[dict[str, str]]]]  # None: no S-CRTM event
    keys: dict[str, set[tuple[str, str]]]  # pk/kek/db/dbx/vendor_db -> {(owner, data hex)}
    mokdig: list[dict[str, str]]
    mokxdig: list[dict[str, str]]
    kernels: list[Kernel]
    raw: dict[str, Any] = field(default_factory=dict)
    pinned: list[tuple[int, int, dict[str, str]]] = field(default_factory=list)  # (pcr, type, digest)


# --- helpers -------------------------------------------------------------------------------------


def _where(ev: el.Event) -> dict[str, Any]:
    return {"event": ev.number, "pcr": ev.pcr, "event_type": ev.type_name}


def mb_failure(kind: str, reason: str, ev: el.Event | None = None, **extra: Any) -> Failure:
    ctx: dict[str, Any] = {"context": "Boot attestation failed", "policy": POLICY_NAME, "reason": reason}
    if ev is not None:
        ctx.update(_where(ev))
    ctx.update(extra)
    return Failure(f"{PREFIX}.{kind}", ctx, Severity.CRITICAL, recoverable=True)


def _digest_ok(ev: el.Event, allowed: Iterable[dict[str, str]]) -> bool:
    """True when one of the event's digests equals an allowed digest of the same algorithm."""
    for good in allowed:
        for alg, hexval in good.items():
            got = ev.digests.get(alg)
            if got is not None and got.hex() == hexval:
                return True
    return False


def _data_hash_ok(ev: el.Event) -> bool:
    """Every digest of the event is the hash of its data (separators, EFI actions)."""
    return all(hashlib.new(alg, ev.data).digest() == d for alg, d in ev.digests.items() if alg != "sm3_256")


class Evaluator:
    def __init__(self, ref: RefState) -> None:
        self.ref = ref
        self.fails: list[Failure] = []
        self.seen: dict[tuple[Any, ...], el.Event] = {}
        self.crtm: list[el.Event] = []
        self.blobs: list[el.Event] = []
        self.apps: list[el.Event] = []
        self.initrds: list[el.Event] = []
        self.vmlinuz: list[el.Event] = []
        self.cmdlines: list[el.Event] = []
        self.config_flags = 0
        self.pinned = list(enumerate(ref.pinned))  # not yet matched by an event

    def unexpected(self, reason: str, ev: el.Event) -> None:
        """An event of a kind the policy has no rule for: allowed only as one of its pinned events."""
        for i, (_n, (pcr, etype, digest)) in enumerate(self.pinned):
            if pcr == ev.pcr and etype == ev.event_type and _digest_ok(ev, [digest]):
                del self.pinned[i]
                return
        self.fail("unexpected_event", reason, ev)

    def fail(self, kind: str, reason: str, ev: el.Event | None = None, **extra: Any) -> None:
        self.fails.append(mb_failure(kind, reason, ev, **extra))

    def once(self, key: tuple[Any, ...], ev: el.Event) -> bool:
        if key in self.seen:
            self.fail("event_repeated", f"{key[-1]} measured more than once "
                      f"(first as event {self.seen[key].number})", ev)  # fmt: skip
            return False
        self.seen[key] = ev
        return True

    # -- per event --

    def event(self, ev: el.Event) -> None:
        t, pcr = ev.event_type, ev.pcr
        if t == el.EV_NO_ACTION:
            return  # never extended: no evidence either way (Spec ID, StartupLocality, ...)
        if ev.decode_error is not None and t in _DECODED_TYPES:
            self.fail("bad_event_data", f"event data does not decode: {ev.decode_error}", ev)
            return
        if t == el.EV_SEPARATOR and pcr <= 7:
            if ev.data not in (b"\x00" * 4, b"\xff" * 4) or not _data_hash_ok(ev):
                self.fail("invalid_separator", "separator is not 0x00000000/0xffffffff or its digest differs", ev)
            return
        if t == el.EV_EFI_ACTION and pcr in (1, 4, 5):
            text = ev.data.decode("ascii", "replace")
            if text not in _EFI_ACTIONS[pcr] or not _data_hash_ok(ev):
                self.unexpected(f"EV_EFI_ACTION {text!r} not expected in PCR {pcr}", ev)
            return
        rule = _PCR_RULES.get(pcr)
        if rule is None or not rule(self, ev):
            self.unexpected(f"{ev.type_name} in PCR {pcr} is not allowed by the policy", ev)

    # Each PCR's rule takes the events of the kinds it knows (True) and leaves the rest (False) to
    # `unexpected`: allowed only as a pinned event.

    def firmware(self, ev: el.Event) -> bool:  # PCR 0
        if ev.event_type == el.EV_S_CRTM_VERSION:
            self.crtm.append(ev)
        elif ev.event_type in (el.EV_EFI_PLATFORM_FIRMWARE_BLOB, el.EV_EFI_PLATFORM_FIRMWARE_BLOB2):
            self.blobs.append(ev)
        else:
            return False
        return True

    def platform_config(self, ev: el.Event) -> bool:  # PCR 1
        t = ev.event_type
        if t in (el.EV_CPU_MICROCODE, el.EV_EFI_HANDOFF_TABLES, el.EV_EFI_HANDOFF_TABLES2):
            self.once((ev.pcr, t), ev)
        elif t == el.EV_PLATFORM_CONFIG_FLAGS:
            self.config_flags += 1
            if self.config_flags > 4:
                self.fail("event_repeated", "more than 4 EV_PLATFORM_CONFIG_FLAGS events", ev)
        elif t == el.EV_EFI_VARIABLE_BOOT:
            var = ev.decoded
            if var["VariableName"] != el.EFI_GLOBAL_VARIABLE or not _BOOT_VAR.fullmatch(var["UnicodeName"]):
                self.unexpected(f"boot variable {var['UnicodeName']} not expected", ev)
        else:
            return False
        return True

    def option_roms(self, ev: el.Event) -> bool:  # PCR 2
        # option ROM drivers: no reference values (upstream accepts them too)
        return ev.event_type == el.EV_EFI_BOOT_SERVICES_DRIVER

    def boot_application(self, ev: el.Event) -> bool:  # PCR 4
        if ev.event_type != el.EV_EFI_BOOT_SERVICES_APPLICATION:
            return False
        self.apps.append(ev)
        return True

    def gpt(self, ev: el.Event) -> bool:  # PCR 5
        if ev.event_type != el.EV_EFI_GPT_EVENT:
            return False
        self.once((ev.pcr, ev.event_type), ev)
        return True

    def secure_boot(self, ev: el.Event) -> bool:  # PCR 7
        if ev.event_type == el.EV_EFI_VARIABLE_DRIVER_CONFIG:
            self.driver_config(ev)
        elif ev.event_type == el.EV_EFI_VARIABLE_AUTHORITY:
            self.authority(ev)
        else:
            return False
        return True

    def grub_command(self, ev: el.Event) -> bool:  # PCR 8
        if ev.event_type != el.EV_IPL:
            return False
        text = ev.decoded["String"]
        if text.startswith("kernel_cmdline: "):
            self.cmdlines.append(ev)
        elif not text.startswith("grub_cmd: "):
            self.unexpected("PCR 8 EV_IPL is neither grub_cmd nor kernel_cmdline", ev)
        return True

    def grub_file(self, ev: el.Event) -> bool:  # PCR 9
        if ev.event_type != el.EV_IPL:
            return False
        text = ev.decoded["String"]
        kind = pcr9_kind(text)
        if kind == "vmlinuz":
            self.vmlinuz.append(ev)
        elif kind == "initrd":
            self.initrds.append(ev)
        elif kind == "other":
            self.unexpected(f"PCR 9 file {text!r} is not grub's, a kernel or an initrd", ev)
        return True

    def mok_event(self, ev: el.Event) -> bool:  # PCR 14
        if ev.event_type != el.EV_IPL:
            return False
        self.mok(ev)
        return True

    def driver_config(self, ev: el.Event) -> None:
        var = ev.decoded
        guid, name, data = var["VariableName"], var["UnicodeName"], var["VariableData"]
        key = (guid, name)
        if key == (el.EFI_GLOBAL_VARIABLE, "SecureBoot"):
            self.secure_boot_variable(ev, data)
            self.once(("config", *key), ev)
            return
        which = {(el.EFI_GLOBAL_VARIABLE, "PK"): "pk", (el.EFI_GLOBAL_VARIABLE, "KEK"): "kek",
                 (el.EFI_IMAGE_SECURITY_DATABASE, "db"): "db", (el.EFI_IMAGE_SECURITY_DATABASE, "dbx"): "dbx",
                 (el.EFI_IMAGE_SECURITY_DATABASE, "vendor_db"): "vendor_db"}.get(key)  # fmt: skip
        if which is None:
            self.unexpected(f"Secure Boot variable {name} ({guid}) is not known to the policy", ev)
            return
        if not self.once(("config", *key), ev):
            return
        allowed = self.ref.keys[which]
        if not self.ref.has_secureboot and not allowed:
            return  # without Secure Boot an empty list in the policy accepts whatever is there
        if not isinstance(data, list):
            self.fail("bad_event_data", f"{name} is not a list of EFI signature lists", ev)
            return
        if which == "dbx":
            self.dbx(ev, data, allowed)
            return
        self.key_lists(ev, which, data, allowed)

    def secure_boot_variable(self, ev: el.Event, data: Any) -> None:
        enabled = isinstance(data, dict) and data.get("Enabled") == "Yes"
        if enabled != self.ref.has_secureboot:
            kind = "secure_boot_disabled" if self.ref.has_secureboot else "secure_boot_enabled"
            self.fail(kind, f"SecureBoot is {'enabled' if enabled else 'disabled'}, the policy wants "
                      f"{'enabled' if self.ref.has_secureboot else 'disabled'}", ev)  # fmt: skip

    def key_lists(self, ev: el.Event, which: str, data: list[dict[str, Any]], allowed: set[tuple[str, str]]) -> None:
        """PK/KEK (X.509 only), db, vendor_db: every key of every list must be allowed."""
        name = ev.decoded["UnicodeName"]
        types = {el.EFI_CERT_X509_GUID} if which in ("pk", "kek") else _X509_OR_SHA256
        for lst in data:
            if lst["SignatureType"] not in types:
                self.fail(f"{which}_not_allowed", f"{name} holds a list of type {lst['SignatureType']}", ev)
                return
            for k in lst["Keys"]:
                if (k["SignatureOwner"], k["SignatureData"]) not in allowed:
                    self.fail(f"{which}_not_allowed", f"{name} holds a key the policy does not allow", ev,
                              signature_owner=k["SignatureOwner"], signature_data=k["SignatureData"][:64])
                    return

    def dbx(self, ev: el.Event, data: list[dict[str, Any]], required: set[tuple[str, str]]) -> None:
        # real dbx variables hold several lists (SHA-256 hashes and X.509 certificates): what
        # counts is that every entry the policy requires is in one of them
        have = {(k["SignatureOwner"], k["SignatureData"]) for lst in data for k in lst["Keys"]}
        missing = sorted(required - have)
        if missing:
            self.fail("dbx_missing_entries", f"dbx lacks {len(missing)} required entries", ev,
                      missing=[d for _, d in missing][:8])

    def authority(self, ev: el.Event) -> None:
        # Firmware and shim measure the certificate that verified each image; real logs repeat one
        # (older shims, once per image) or hold several db certificates (an option ROM's CA and
        # the OS loader's). db/MokList contents are checked where the variables are measured.
        var = ev.decoded
        key = (var["VariableName"], var["UnicodeName"])
        if key == (el.EFI_IMAGE_SECURITY_DATABASE, "db"):
            pass  # a certificate from db, whose content the policy checks (shim's digest is checked itself)
        elif key == (el.EFI_IMAGE_SECURITY_DATABASE, "vendor_db"):
            if not self.ref.has_secureboot and not self.ref.keys["vendor_db"]:
                return
            data = var["VariableData"]
            sigs = data if isinstance(data, list) else []
            if not sigs or any((s["SignatureOwner"], s["SignatureData"]) not in self.ref.keys["vendor_db"]
                               for s in sigs):  # fmt: skip
                self.fail("vendor_db_not_allowed", "vendor_db authority is not an allowed key", ev)
        elif key[0] == el.SHIM_LOCK_GUID and key[1] in ("SbatLevel", "Shim", "MokListRT", "MokListTrusted"):
            pass
        else:
            self.unexpected(f"authority {key[1]} ({key[0]}) is not known to the policy", ev)

    def mok(self, ev: el.Event) -> None:
        text = ev.decoded["String"]
        if text == "MokList":
            if not _digest_ok(ev, self.ref.mokdig):
                self.fail("mok_not_allowed", "MokList digest is not allowed", ev)
        elif text == "MokListX":
            if not _digest_ok(ev, self.ref.mokxdig):
                self.fail("mok_not_allowed", "MokListX digest is not allowed", ev)
        elif text == "MokListTrusted":
            self.once((14, text), ev)
        else:
            self.unexpected(f"PCR 14 EV_IPL {text!r} is not known to the policy", ev)

    # -- after the last event --

    def finish(self) -> None:
        if self.ref.has_secureboot and ("config", el.EFI_GLOBAL_VARIABLE, "SecureBoot") not in self.seen:
            self.fail("secure_boot_disabled", "the log measures no SecureBoot variable, the policy wants it enabled")
        self.finish_bios()
        self.finish_kernel()
        for n, (pcr, etype, _digest) in self.pinned:
            self.fail("pinned_event_missing", f"pinned_events[{n}] ({el.event_type_name(etype)} in PCR {pcr}) "
                      "matches no event of the log", policy_field=f"pinned_events[{n}]")  # fmt: skip

    def finish_bios(self) -> None:
        best: tuple[int, Failure] | None = None
        for scrtm, blobs in self.ref.scrtm_and_bios:
            f = self._bios_mismatch(scrtm, blobs)
            if f is None:
                return
            score = f.context.get("event", 10**9)
            if best is None or score > best[0]:
                best = (score, f)
        if best is not None:
            self.fails.append(best[1])
        elif not self.ref.scrtm_and_bios:
            self.fail("scrtm_bios_not_allowed", "the policy allows no S-CRTM/firmware")

    def _bios_mismatch(self, scrtm: dict[str, str] | None, blobs: list[dict[str, str]]) -> Failure | None:
        if scrtm is None:
            if self.crtm:
                return mb_failure("scrtm_bios_not_allowed", "an EV_S_CRTM_VERSION event where the policy has none",
                             self.crtm[0])
        elif len(self.crtm) != 1:
            return mb_failure("scrtm_bios_not_allowed", f"{len(self.crtm)} EV_S_CRTM_VERSION events, one expected",
                         self.crtm[1] if len(self.crtm) > 1 else None)
        elif not _digest_ok(self.crtm[0], [scrtm]):
            return mb_failure("scrtm_bios_not_allowed", "S-CRTM version digest is not allowed", self.crtm[0])
        for i, ev in enumerate(self.blobs):
            if i >= len(blobs) or not _digest_ok(ev, [blobs[i]]):
                return mb_failure("scrtm_bios_not_allowed", f"firmware blob #{i} is not allowed", ev)
        if len(self.blobs) < len(blobs):
            return mb_failure("scrtm_bios_not_allowed", f"{len(self.blobs)} firmware blobs, {len(blobs)} expected")
        return None

    def finish_kernel(self) -> None:
        best: list[Failure] | None = None
        best_score = -1
        for k in self.ref.kernels:
            fails = self._kernel_mismatch(k)
            if not fails:
                return
            # report against the allowed kernel entry that the boot follows longest
            score = min(f.context.get("event", 10**9) for f in fails)
            if score > best_score:
                best, best_score = fails, score
        if best is None:
            self.fail("boot_application_not_allowed", "the policy allows no kernels")
        else:
            self.fails.extend(best)

    def _kernel_mismatch(self, k: Kernel) -> list[Failure]:
        fails = self._chain_mismatch(k)
        fails += self._one(self.initrds, k.initrd, "initrd_not_allowed", "initrd")
        if not self.ref.has_secureboot:
            fails += self._one(self.vmlinuz, k.vmlinuz, "kernel_not_allowed", "vmlinuz")
        elif len(self.vmlinuz) > 1:
            fails.append(mb_failure("kernel_not_allowed", "more than one vmlinuz read by grub", self.vmlinuz[1]))
        return fails + self._cmdline_mismatch(k)

    def _chain_mismatch(self, k: Kernel) -> list[Failure]:
        """The PCR 4 boot applications against the entry's chain (at most one failure)."""
        if k.apps is not None:
            want = [(f"#{i} of the policy's boot_applications", d) for i, d in enumerate(k.apps)]
        else:
            want = [("shim", {"sha256": k.shim or ""}), ("grub", {"sha256": k.grub or ""})]
            if self.ref.has_secureboot and k.kernel:
                want.append(("kernel", {"sha256": k.kernel}))
                if len(self.apps) == 4:
                    want.append(("kernel", {"sha256": k.kernel}))  # some grubs measure the kernel twice
        for i, ev in enumerate(self.apps):
            if i >= len(want):
                return [mb_failure("boot_application_not_allowed",
                                   f"boot application #{i} is one more than the policy's chain", ev)]
            if not _digest_ok(ev, [want[i][1]]):
                return [mb_failure("boot_application_not_allowed",
                                   f"boot application #{i} ({want[i][0]} expected) has no allowed digest", ev)]
        if len(self.apps) < len(want):
            return [mb_failure("boot_application_not_allowed",
                               f"boot chain ends before the {want[len(self.apps)][0]} "
                               f"({len(self.apps)} of {len(want)})", self.apps[-1] if self.apps else None)]
        return []

    def _cmdline_mismatch(self, k: Kernel) -> list[Failure]:
        if k.cmdline is None:
            if self.cmdlines:
                return [mb_failure("kernel_cmdline_not_allowed", "a kernel_cmdline event where the policy has none",
                                   self.cmdlines[0])]
        elif len(self.cmdlines) != 1:
            return [mb_failure("kernel_cmdline_not_allowed", f"{len(self.cmdlines)} kernel_cmdline events",
                               self.cmdlines[1] if len(self.cmdlines) > 1 else None)]
        elif not k.cmdline.fullmatch(self.cmdlines[0].decoded["String"]):
            return [mb_failure("kernel_cmdline_not_allowed", "kernel command line is not allowed", self.cmdlines[0],
                               cmdline=self.cmdlines[0].decoded["String"][len("kernel_cmdline: "):])]
        return []

    @staticmethod
    def _one(events: list[el.Event], digest: dict[str, str] | None, kind: str, what: str) -> list[Failure]:
        if digest is None:  # the policy's boot measured none
            return [mb_failure(kind, f"a {what} event where the policy has none", events[0])] if events else []
        if len(events) != 1:
            return [mb_failure(kind, f"{len(events)} {what} events, one expected", events[1] if len(events) > 1 else None)]
        if not _digest_ok(events[0], [digest]):
            return [mb_failure(kind, f"{what} digest is not allowed", events[0])]
        return []


#: PCR -> its rule (PCRs 3 and 6 hold separators and EFI actions only)
_PCR_RULES: dict[int, Callable[[Evaluator, el.Event], bool]] = {
    0: Evaluator.firmware, 1: Evaluator.platform_config, 2: Evaluator.option_roms,
    4: Evaluator.boot_application, 5: Evaluator.gpt, 7: Evaluator.secure_boot,
    8: Evaluator.grub_command, 9: Evaluator.grub_file, 14: Evaluator.mok_event,
}  # fmt: skip


def unbound_data(log: el.EventLog) -> list[Failure]:
    """One ``event_data_mismatch`` failure per event (of the PCRs a policy reads) whose data is not
    what its digests measured: edited after the measurement, so no rule may read it. Events of
    other PCRs are not checked: their digests are not compared with the quote either."""
    return [mb_failure("event_data_mismatch", reason, ev) for ev, reason in eventlog_data.unbound_events(log)
            if ev.pcr in RELEVANT_PCRS]


def evaluate(ref: RefState, log: el.EventLog) -> list[Failure]:
    """Check a parsed event log against a reference state (empty list = the boot is allowed).

    Event data is first checked against its digests (:func:`unbound_data`); a log with edited
    data gets only those failures, since every rule below would read what an attacker wrote."""
    forged = unbound_data(log)
    if forged:
        return forged
    ev_check = Evaluator(ref)
    for ev in log.events:
        if ev.pcr in RELEVANT_PCRS:
            ev_check.event(ev)
    ev_check.finish()
    return ev_check.fails


def pcr9_kind(text: str) -> str:
    """What grub read, by its path (upstream's rules): grub's own files, a kernel, an initrd, other."""
    if "/loader/entries" in text or "/grub" in text:
        return "grub"
    if "/vmlinuz" in text:
        return "vmlinuz"
    if "/initrd" in text or "/initramfs" in text:
        return "initrd"
    return "other"
