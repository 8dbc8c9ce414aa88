"""A measured-boot reference state from a known-good UEFI event log (``keytrio policy create
measured-boot``, the counterpart of upstream's ``keylime-policy create measured-boot``).

It writes upstream's format wherever that format can say the boot, keytrio's extension
(:mod:`protocol.mb_policy`) where it cannot, and checks the result against the log with the same
rules the verifier runs (:mod:`protocol.mb_rules`).
"""

from __future__ import annotations

import re
from typing import Any

from keytrio.protocol import eventlog as el
from keytrio.protocol import eventlog_replay
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.mb_policy import parse_refstate
from keytrio.protocol.mb_rules import RELEVANT_PCRS, Evaluator, RefState, evaluate, pcr9_kind, unbound_data

_POLICY_BANKS = ("sha256", "sha384", "sha512", "sha1", "sm3_256")  # the digest the policy pins, best first


class RefStateCreateError(ValidationError):
    """The log cannot give a reference state (e.g. Secure Boot off without allow_no_secureboot);
    the reason names the event."""

    def __init__(self, reason: str) -> None:
        super().__init__("event_log", reason)


def refstate_from_log(log: el.EventLog, *, allow_no_secureboot: bool = False) -> dict[str, Any]:
    """A reference state accepting exactly this boot, in upstream's format (and with the choices of
    upstream's ``keylime-policy create measured-boot``; ``-i`` = ``allow_no_secureboot``) where
    that format can say it, with keytrio's extension (module text) where it cannot: boot chains
    other than shim -> grub -> kernel, no initrd, no kernel command line, a log without sha256,
    events of kinds upstream's rules refuse (pinned by digest). The result is checked: it accepts
    this log, or RefStateCreateError names the event it could not account for."""
    forged = unbound_data(log)
    if forged:
        raise RefStateCreateError(forged[0].context["reason"])
    boot = _Boot(log, _policy_bank(log))
    secure_boot = _secure_boot(boot, allow_no_secureboot)
    ref: dict[str, Any] = {
        "has_secureboot": secure_boot,
        "scrtm_and_bios": [_bios(boot)],
        **_keys(boot),
        **_mok(boot),
        "kernels": [_kernel_entry(boot, secure_boot)],
    }
    pinned = _unknown_events(boot, parse_refstate(ref))
    if pinned:
        ref["pinned_events"] = pinned
    _check_accepts(ref, log)
    return ref


class _Boot:
    """The log and the bank the policy pins digests of."""

    def __init__(self, log: el.EventLog, bank: str) -> None:
        self.log = log
        self.bank = bank

    def dig(self, ev: el.Event) -> dict[str, str]:
        return {self.bank: "0x" + ev.digests[self.bank].hex()}

    def of(self, pcr: int, *types: int) -> list[el.Event]:
        return [ev for ev in self.log.events if ev.pcr == pcr and ev.event_type in types]

    def variables(self) -> list[el.Event]:
        return [ev for ev in self.of(7, el.EV_EFI_VARIABLE_DRIVER_CONFIG) if isinstance(ev.decoded, dict)]


def _policy_bank(log: el.EventLog) -> str:
    """sha256 when every relevant event has it (upstream's choice), else the best complete bank."""
    reasons = []
    for bank in _POLICY_BANKS:
        if bank not in log.algorithms:
            continue
        gaps = {p: ev for p, ev in eventlog_replay.incomplete_pcrs(log, bank).items() if p in RELEVANT_PCRS}
        if not gaps:
            return bank
        reasons.append(f"{gaps[min(gaps)].where()} has no {bank} digest")
    raise RefStateCreateError("no bank of the log has a digest in every event of PCRs 0-9 and 14"
                              + (f" ({'; '.join(reasons)})" if reasons else ""))  # fmt: skip


def _secure_boot(boot: _Boot, allow_no_secureboot: bool) -> bool:
    sb_event = next((ev for ev in boot.variables() if ev.decoded.get("UnicodeName") == "SecureBoot"), None)
    secure_boot = sb_event is not None and sb_event.decoded.get("VariableData") == {"Enabled": "Yes"}
    if not secure_boot and not allow_no_secureboot:
        where = "no SecureBoot variable is measured" if sb_event is None else f"{sb_event.where()} says so"
        raise RefStateCreateError(f"Secure Boot is disabled in this log ({where}); allow it explicitly "
                                  "(-i/--without-secureboot) for a measured-boot-only policy")  # fmt: skip
    return secure_boot


def _bios(boot: _Boot) -> dict[str, Any]:
    bios: dict[str, Any] = {}
    crtm = boot.of(0, el.EV_S_CRTM_VERSION)
    if crtm:
        bios["scrtm"] = boot.dig(crtm[0])
    blobs = boot.of(0, el.EV_EFI_PLATFORM_FIRMWARE_BLOB, el.EV_EFI_PLATFORM_FIRMWARE_BLOB2)
    bios["platform_firmware"] = [boot.dig(ev) for ev in blobs]
    return bios


def _flat_keys(data: Any) -> list[dict[str, str]]:
    if not isinstance(data, list):
        return []
    return [{"SignatureOwner": k["SignatureOwner"], "SignatureData": "0x" + k["SignatureData"]}
            for lst in data if isinstance(lst, dict) for k in lst.get("Keys", [])]  # fmt: skip


def _keys(boot: _Boot) -> dict[str, list[dict[str, str]]]:
    """pk, kek, db, dbx as measured (PCR 7 variables), vendor_db as shim's authority events."""
    keys: dict[str, list[dict[str, str]]] = {"pk": [], "kek": [], "db": [], "dbx": []}
    for ev in boot.variables():
        if ev.decoded.get("UnicodeName", "").lower() in keys:
            keys[ev.decoded["UnicodeName"].lower()] = _flat_keys(ev.decoded.get("VariableData"))
    keys["vendor_db"] = [
        {"SignatureOwner": s["SignatureOwner"], "SignatureData": "0x" + s["SignatureData"]}
        for ev in boot.of(7, el.EV_EFI_VARIABLE_AUTHORITY) if isinstance(ev.decoded, dict)
        and ev.decoded.get("UnicodeName", "").lower() == "vendor_db" and isinstance(ev.decoded.get("VariableData"), list)
        for s in ev.decoded["VariableData"]
    ]  # fmt: skip
    return keys


def _mok(boot: _Boot) -> dict[str, list[dict[str, str]]]:
    mok_ipl = [ev for ev in boot.of(14, el.EV_IPL) if isinstance(ev.decoded, dict)]
    return {"mokdig": [boot.dig(ev) for ev in mok_ipl if ev.decoded["String"] == "MokList"],
            "mokxdig": [boot.dig(ev) for ev in mok_ipl if ev.decoded["String"] == "MokListX"]}  # fmt: skip


def _kernel_entry(boot: _Boot, secure_boot: bool) -> dict[str, Any]:
    """The boot's kernels[] entry: upstream's keys when its tool would write them (sha256 digests,
    a chain of 3 or 4 applications with Secure Boot, 2 without: shim, grub (, kernel) by position),
    keytrio's ``boot_applications`` (and ``initrd``/``vmlinuz`` digests) otherwise; a key is left
    out when this boot measured no such thing."""
    bank, dig, log = boot.bank, boot.dig, boot.log
    apps = [ev for ev in log.events if ev.pcr == 4 and ev.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION]
    ipl = [ev for ev in log.events if ev.event_type == el.EV_IPL and isinstance(ev.decoded, dict)]
    kernel: dict[str, Any] = {}
    upstream = bank == "sha256" and (
        (secure_boot and (len(apps) == 3 or (len(apps) == 4 and apps[3].digests == apps[2].digests)))
        or (not secure_boot and len(apps) == 2))  # fmt: skip
    if upstream:
        if secure_boot:
            kernel["kernel_authcode_sha256"] = dig(apps[2])[bank]
        kernel["shim_authcode_sha256"] = dig(apps[0])[bank]
        kernel["grub_authcode_sha256"] = dig(apps[1])[bank]
    else:
        kernel["boot_applications"] = [dig(ev) for ev in apps]
    pcr9 = [ev for ev in ipl if ev.pcr == 9]
    initrd = next((ev for ev in pcr9 if pcr9_kind(ev.decoded["String"]) == "initrd"), None)
    if initrd is not None:
        kernel.update({"initrd_plain_sha256": dig(initrd)[bank]} if bank == "sha256" else {"initrd": dig(initrd)})
    vmlinuz = next((ev for ev in pcr9 if pcr9_kind(ev.decoded["String"]) == "vmlinuz"), None)
    if not secure_boot and vmlinuz is not None:
        kernel.update({"vmlinuz_plain_sha256": dig(vmlinuz)[bank]} if bank == "sha256" else {"vmlinuz": dig(vmlinuz)})
    cmdline = next((ev for ev in ipl if ev.pcr == 8 and ev.decoded["String"].startswith("kernel_cmdline: ")), None)
    if cmdline is not None:
        kernel["kernel_cmdline"] = re.escape(cmdline.decoded["String"][len("kernel_cmdline: "):])
    return kernel


class _Collector(Evaluator):
    """Runs the rules on the known-good log and keeps the events no rule covers (to pin them)."""

    def __init__(self, ref: RefState) -> None:
        super().__init__(ref)
        self.unknown: list[el.Event] = []

    def unexpected(self, reason: str, ev: el.Event) -> None:
        self.unknown.append(ev)


def _unknown_events(boot: _Boot, ref: RefState) -> list[dict[str, Any]]:
    """``pinned_events`` entries for the events no rule of ``ref`` covers."""
    collector = _Collector(ref)
    for ev in boot.log.events:
        if ev.pcr in RELEVANT_PCRS:
            collector.event(ev)
    return [{"pcr": ev.pcr, "event_type": ev.type_name, "digests": boot.dig(ev)} for ev in collector.unknown]


def _check_accepts(ref: dict[str, Any], log: el.EventLog) -> None:
    fails = evaluate(parse_refstate(ref), log)
    if fails:
        ctx = fails[0].context
        where = f" at event {ctx['event']} (PCR {ctx['pcr']}, {ctx['event_type']})" if "event" in ctx else ""
        raise RefStateCreateError(f"the measured-boot rules refuse this boot{where}: {ctx['reason']} "
                                  f"({fails[0].event_id})")  # fmt: skip
