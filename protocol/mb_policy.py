"""Measured-boot policy: the reference state ``keylime-policy create measured-boot`` writes, and
its evaluation against a parsed UEFI event log.

Reference state (JSON object; hex values are ``0x`` + lowercase hex)::

    {"has_secureboot": true,
     "scrtm_and_bios": [{"scrtm": {"sha256": "0x.."}, "platform_firmware": [{"sha256": "0x.."}, ...]}],
     "pk": [{"SignatureOwner": uuid, "SignatureData": "0x.."}], "kek": [...], "db": [...],
     "dbx": [...], "vendor_db": [...] (optional), "mokdig": [{"sha256": ..}], "mokxdig": [...],
     "kernels": [{"shim_authcode_sha256", "grub_authcode_sha256", "kernel_authcode_sha256"
                  (or "vmlinuz_plain_sha256" without Secure Boot), "initrd_plain_sha256",
                  "kernel_cmdline" (a regular expression)}]}

The checks follow the meaning of upstream's "example" policy: every event on PCRs 0-9 and 14 must
be of a kind the policy knows; SecureBoot must be as the policy says; PK/KEK/db (and vendor_db)
hold only allowed keys; dbx holds at least the listed entries; the PCR 4 boot applications are
exactly shim, grub, kernel of one allowed kernel entry (the kernel may be measured twice), with
that entry's initrd (PCR 9) and kernel command line (PCR 8); S-CRTM and firmware blobs (PCR 0)
match one allowed ``scrtm_and_bios`` entry. Each failure is a :class:`~protocol.failures.Failure`
``measured_boot.<what>`` whose context names the offending event (number, PCR, type).
An empty reference state (``{}`` or empty text) means "no measured-boot policy".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from keytrio.protocol import eventlog as el
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.failures import Failure, Severity

POLICY_NAME = "example"  # upstream's policy of this meaning
RELEVANT_PCRS = frozenset([*range(10), 14])  # what the policy looks at
#: PCRs the verifier asks for when an agent has an mb policy (upstream's MEASUREDBOOT_PCRS)
MEASUREDBOOT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15)
PREFIX = "measured_boot"
_HEX = re.compile(r"0x[0-9a-f]+")

_EFI_ACTIONS = {
    1: {"Entering ROM Based Setup"},
    4: {"Calling EFI Application from Boot Option", "Returning from EFI Application from Boot Option"},
    5: {"Exit Boot Services Invocation", "Exit Boot Services Returned with Failure",
        "Exit Boot Services Returned with Success"},
    6: {"UEFI Debug Mode"},
}  # fmt: skip
_BOOT_VAR = re.compile(r"BootOrder|Boot[0-9a-fA-F]+")
_X509_OR_SHA256 = {el.EFI_CERT_X509_GUID, el.EFI_CERT_SHA256_GUID}


class MbPolicyError(ValidationError):
    """The reference state is not one this evaluator understands (``field`` names the part)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"mb_policy.{field}", reason)


@dataclass(frozen=True)
class Kernel:
    shim: str
    grub: str
    kernel: str | None  # Authenticode sha256 (Secure Boot)
    vmlinuz: str | None  # plain sha256 (no Secure Boot)
    initrd: str
    cmdline: re.Pattern[str]


@dataclass
class RefState:
    has_secureboot: bool
    scrtm_and_bios: list[tuple[dict[str, str], list[dict[str, str]]]]
    keys: dict[str, set[tuple[str, str]]]  # pk/kek/db/dbx/vendor_db -> {(owner, data hex)}
    mokdig: list[dict[str, str]]
    mokxdig: list[dict[str, str]]
    kernels: list[Kernel]
    raw: dict[str, Any] = field(default_factory=dict)


# --- reference state -----------------------------------------------------------------------------


def _hex(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise MbPolicyError(where, "must be 0x followed by lowercase hex digits")
    return value[2:]


def _digest(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise MbPolicyError(where, "must be an object {algorithm: 0xhex}")
    return {str(alg): _hex(v, f"{where}.{alg}") for alg, v in value.items()}


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise MbPolicyError(key, "must be a list")
    return value


def _sigs(doc: dict[str, Any], key: str) -> set[tuple[str, str]]:
    out = set()
    for i, sig in enumerate(_list(doc, key)):
        if not isinstance(sig, dict) or not isinstance(sig.get("SignatureOwner"), str):
            raise MbPolicyError(f"{key}[{i}]", "must be {SignatureOwner, SignatureData}")
        out.add((sig["SignatureOwner"].lower(), _hex(sig.get("SignatureData"), f"{key}[{i}].SignatureData")))
    return out


def load_json(policy: str | bytes | dict[str, Any] | None) -> dict[str, Any]:
    """The reference state as a JSON object ({} for an empty policy)."""
    if policy is None or policy == "" or policy == b"":
        return {}
    if isinstance(policy, dict):
        return policy
    try:
        doc = json.loads(policy)
    except (ValueError, UnicodeDecodeError):
        raise MbPolicyError("json", "is not JSON") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise MbPolicyError("json", "must be a JSON object")
    return doc


def is_empty(policy: str | bytes | dict[str, Any] | None) -> bool:
    return not load_json(policy)


def parse_refstate(policy: str | bytes | dict[str, Any]) -> RefState:
    """Validate a reference state; :class:`MbPolicyError` names the first bad part."""
    doc = load_json(policy)
    if not doc:
        raise MbPolicyError("json", "is empty")
    sb = doc.get("has_secureboot", True)
    if not isinstance(sb, bool):
        raise MbPolicyError("has_secureboot", "must be true or false")
    bios = []
    for i, entry in enumerate(_list(doc, "scrtm_and_bios")):
        if not isinstance(entry, dict) or not isinstance(entry.get("platform_firmware"), list):
            raise MbPolicyError(f"scrtm_and_bios[{i}]", "must be {scrtm, platform_firmware: [...]}")
        bios.append((_digest(entry.get("scrtm"), f"scrtm_and_bios[{i}].scrtm"),
                     [_digest(d, f"scrtm_and_bios[{i}].platform_firmware[{j}]")
                      for j, d in enumerate(entry["platform_firmware"])]))  # fmt: skip
    keys = {k: _sigs(doc, k) for k in ("pk", "kek", "db", "dbx")}
    keys["vendor_db"] = _sigs(doc, "vendor_db") if "vendor_db" in doc else set()
    mok = [_digest(d, f"mokdig[{i}]") for i, d in enumerate(_list(doc, "mokdig"))]
    mokx = [_digest(d, f"mokxdig[{i}]") for i, d in enumerate(_list(doc, "mokxdig"))]
    kernels = []
    for i, k in enumerate(_list(doc, "kernels")):
        where = f"kernels[{i}]"
        if not isinstance(k, dict):
            raise MbPolicyError(where, "must be an object")
        cmdline = k.get("kernel_cmdline")
        if not isinstance(cmdline, str):
            raise MbPolicyError(f"{where}.kernel_cmdline", "must be a string (regular expression)")
        try:
            pattern = re.compile("kernel_cmdline: " + cmdline)
        except re.error:
            raise MbPolicyError(f"{where}.kernel_cmdline", "is not a regular expression") from None
        kernels.append(Kernel(
            shim=_hex(k.get("shim_authcode_sha256"), f"{where}.shim_authcode_sha256"),
            grub=_hex(k.get("grub_authcode_sha256"), f"{where}.grub_authcode_sha256"),
            kernel=_hex(k.get("kernel_authcode_sha256"), f"{where}.kernel_authcode_sha256") if sb else None,
            vmlinuz=None if sb else _hex(k.get("vmlinuz_plain_sha256"), f"{where}.vmlinuz_plain_sha256"),
            initrd=_hex(k.get("initrd_plain_sha256"), f"{where}.initrd_plain_sha256"),
            cmdline=pattern,
        ))  # fmt: skip
    return RefState(sb, bios, keys, mok, mokx, kernels, doc)


# --- evaluation ----------------------------------------------------------------------------------


def _where(ev: el.Event) -> dict[str, Any]:
    return {"event": ev.number, "pcr": ev.pcr, "event_type": ev.type_name}


def _fail(kind: str, reason: str, ev: el.Event | None = None, **extra: Any) -> Failure:
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


class _Evaluator:
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

    def fail(self, kind: str, reason: str, ev: el.Event | None = None, **extra: Any) -> None:
        self.fails.append(_fail(kind, reason, ev, **extra))

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
        if ev.decode_error is not None and t in (el.EV_EFI_VARIABLE_DRIVER_CONFIG, el.EV_EFI_VARIABLE_AUTHORITY,
                                                 el.EV_EFI_VARIABLE_BOOT, el.EV_IPL,
                                                 el.EV_EFI_BOOT_SERVICES_APPLICATION):  # fmt: skip
            self.fail("bad_event_data", f"event data does not decode: {ev.decode_error}", ev)
            return
        if t == el.EV_SEPARATOR and pcr <= 7:
            if ev.data not in (b"\x00" * 4, b"\xff" * 4) or not _data_hash_ok(ev):
                self.fail("invalid_separator", "separator is not 0x00000000/0xffffffff or its digest differs", ev)
        elif t == el.EV_EFI_ACTION and pcr in (1, 4, 5):
            text = ev.data.decode("ascii", "replace")
            if text not in _EFI_ACTIONS[pcr] or not _data_hash_ok(ev):
                self.fail("unexpected_event", f"EV_EFI_ACTION {text!r} not expected in PCR {pcr}", ev)
        elif pcr == 0 and t == el.EV_S_CRTM_VERSION:
            self.crtm.append(ev)
        elif pcr == 0 and t in (el.EV_EFI_PLATFORM_FIRMWARE_BLOB, el.EV_EFI_PLATFORM_FIRMWARE_BLOB2):
            self.blobs.append(ev)
        elif pcr == 1 and t in (el.EV_CPU_MICROCODE, el.EV_EFI_HANDOFF_TABLES, el.EV_EFI_HANDOFF_TABLES2):
            self.once((pcr, t), ev)
        elif pcr == 1 and t == el.EV_PLATFORM_CONFIG_FLAGS:
            self.config_flags += 1
            if self.config_flags > 4:
                self.fail("event_repeated", "more than 4 EV_PLATFORM_CONFIG_FLAGS events", ev)
        elif pcr == 1 and t == el.EV_EFI_VARIABLE_BOOT:
            var = ev.decoded
            if var["VariableName"] != el.EFI_GLOBAL_VARIABLE or not _BOOT_VAR.fullmatch(var["UnicodeName"]):
                self.fail("unexpected_event", f"boot variable {var['UnicodeName']} not expected", ev)
        elif pcr == 2 and t == el.EV_EFI_BOOT_SERVICES_DRIVER:
            pass  # option ROM drivers: no reference values (upstream accepts them too)
        elif pcr == 4 and t == el.EV_EFI_BOOT_SERVICES_APPLICATION:
            self.apps.append(ev)
        elif pcr == 5 and t == el.EV_EFI_GPT_EVENT:
            self.once((pcr, t), ev)
        elif pcr == 7 and t == el.EV_EFI_VARIABLE_DRIVER_CONFIG:
            self.driver_config(ev)
        elif pcr == 7 and t == el.EV_EFI_VARIABLE_AUTHORITY:
            self.authority(ev)
        elif pcr == 8 and t == el.EV_IPL:
            text = ev.decoded["String"]
            if text.startswith("kernel_cmdline: "):
                self.cmdlines.append(ev)
            elif not text.startswith("grub_cmd: "):
                self.fail("unexpected_event", "PCR 8 EV_IPL is neither grub_cmd nor kernel_cmdline", ev)
        elif pcr == 9 and t == el.EV_IPL:
            text = ev.decoded["String"]
            if "/loader/entries" in text or "/grub" in text:
                pass
            elif "/vmlinuz" in text:
                self.vmlinuz.append(ev)
            elif "/initrd" in text or "/initramfs" in text:
                self.initrds.append(ev)
            else:
                self.fail("unexpected_event", f"PCR 9 file {text!r} is not grub's, a kernel or an initrd", ev)
        elif pcr == 14 and t == el.EV_IPL:
            self.mok(ev)
        else:
            self.fail("unexpected_event", f"{ev.type_name} in PCR {pcr} is not allowed by the policy", ev)

    def driver_config(self, ev: el.Event) -> None:
        var = ev.decoded
        guid, name, data = var["VariableName"], var["UnicodeName"], var["VariableData"]
        key = (guid, name)
        if key == (el.EFI_GLOBAL_VARIABLE, "SecureBoot"):
            enabled = isinstance(data, dict) and data.get("Enabled") == "Yes"
            if enabled != self.ref.has_secureboot:
                kind = "secure_boot_disabled" if self.ref.has_secureboot else "secure_boot_enabled"
                self.fail(kind, f"SecureBoot is {'enabled' if enabled else 'disabled'}, the policy wants "
                          f"{'enabled' if self.ref.has_secureboot else 'disabled'}", ev)  # fmt: skip
            self.once(("config", *key), ev)
            return
        which = {(el.EFI_GLOBAL_VARIABLE, "PK"): "pk", (el.EFI_GLOBAL_VARIABLE, "KEK"): "kek",
                 (el.EFI_IMAGE_SECURITY_DATABASE, "db"): "db", (el.EFI_IMAGE_SECURITY_DATABASE, "dbx"): "dbx",
                 (el.EFI_IMAGE_SECURITY_DATABASE, "vendor_db"): "vendor_db"}.get(key)  # fmt: skip
        if which is None:
            self.fail("unexpected_event", f"Secure Boot variable {name} ({guid}) is not known to the policy", ev)
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
        if len(data) != 1 or data[0]["SignatureType"] != el.EFI_CERT_SHA256_GUID:
            self.fail("dbx_missing_entries", "dbx is not exactly one list of SHA-256 entries", ev)
            return
        have = {(k["SignatureOwner"], k["SignatureData"]) for k in data[0]["Keys"]}
        missing = sorted(required - have)
        if missing:
            self.fail("dbx_missing_entries", f"dbx lacks {len(missing)} required entries", ev,
                      missing=[d for _, d in missing][:8])

    def authority(self, ev: el.Event) -> None:
        var = ev.decoded
        key = (var["VariableName"], var["UnicodeName"])
        if key == (el.EFI_IMAGE_SECURITY_DATABASE, "db"):
            self.once(("authority", *key), ev)  # the db cert that verified shim (shim's digest is checked itself)
        elif key == (el.EFI_IMAGE_SECURITY_DATABASE, "vendor_db"):
            if not self.once(("authority", *key), ev) or (not self.ref.has_secureboot and not self.ref.keys["vendor_db"]):
                return
            data = var["VariableData"]
            sigs = data if isinstance(data, list) else []
            if not sigs or any((s["SignatureOwner"], s["SignatureData"]) not in self.ref.keys["vendor_db"]
                               for s in sigs):  # fmt: skip
                self.fail("vendor_db_not_allowed", "vendor_db authority is not an allowed key", ev)
        elif key[0] == el.SHIM_LOCK_GUID and key[1] in ("SbatLevel", "Shim", "MokListRT", "MokListTrusted"):
            self.once(("authority", *key), ev)
        else:
            self.fail("unexpected_event", f"authority {key[1]} ({key[0]}) is not known to the policy", ev)

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
            self.fail("unexpected_event", f"PCR 14 EV_IPL {text!r} is not known to the policy", ev)

    # -- after the last event --

    def finish(self) -> None:
        self.finish_bios()
        self.finish_kernel()

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

    def _bios_mismatch(self, scrtm: dict[str, str], blobs: list[dict[str, str]]) -> Failure | None:
        if len(self.crtm) != 1:
            return _fail("scrtm_bios_not_allowed", f"{len(self.crtm)} EV_S_CRTM_VERSION events, one expected",
                         self.crtm[1] if len(self.crtm) > 1 else None)
        if not _digest_ok(self.crtm[0], [scrtm]):
            return _fail("scrtm_bios_not_allowed", "S-CRTM version digest is not allowed", self.crtm[0])
        for i, ev in enumerate(self.blobs):
            if i >= len(blobs) or not _digest_ok(ev, [blobs[i]]):
                return _fail("scrtm_bios_not_allowed", f"firmware blob #{i} is not allowed", ev)
        if len(self.blobs) < len(blobs):
            return _fail("scrtm_bios_not_allowed", f"{len(self.blobs)} firmware blobs, {len(blobs)} expected")
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
        fails: list[Failure] = []
        want = [k.shim, k.grub] + ([k.kernel] if self.ref.has_secureboot and k.kernel else [])
        names = ["shim", "grub", "kernel"]
        if self.ref.has_secureboot and len(self.apps) == 4 and k.kernel:
            want.append(k.kernel)  # some grubs measure the kernel twice
            names.append("kernel")
        for i, ev in enumerate(self.apps):
            if i >= len(want):
                fails.append(_fail("boot_application_not_allowed",
                                   f"boot application #{i} is one more than the policy's chain", ev))
                break
            if not _digest_ok(ev, [{"sha256": want[i]}]):
                fails.append(_fail("boot_application_not_allowed",
                                   f"boot application #{i} ({names[i]} expected) has no allowed digest", ev))
                break
        else:
            if len(self.apps) < len(want):
                missing = names[len(self.apps)]
                fails.append(_fail("boot_application_not_allowed",
                                   f"boot chain ends before the {missing} ({len(self.apps)} of {len(want)})",
                                   self.apps[-1] if self.apps else None))
        fails += self._one(self.initrds, {"sha256": k.initrd}, "initrd_not_allowed", "initrd")
        if not self.ref.has_secureboot and k.vmlinuz is not None:
            fails += self._one(self.vmlinuz, {"sha256": k.vmlinuz}, "kernel_not_allowed", "vmlinuz")
        elif len(self.vmlinuz) > 1:
            fails.append(_fail("kernel_not_allowed", "more than one vmlinuz read by grub", self.vmlinuz[1]))
        if len(self.cmdlines) != 1:
            fails.append(_fail("kernel_cmdline_not_allowed", f"{len(self.cmdlines)} kernel_cmdline events",
                               self.cmdlines[1] if len(self.cmdlines) > 1 else None))
        elif not k.cmdline.fullmatch(self.cmdlines[0].decoded["String"]):
            fails.append(_fail("kernel_cmdline_not_allowed", "kernel command line is not allowed", self.cmdlines[0],
                               cmdline=self.cmdlines[0].decoded["String"][len("kernel_cmdline: "):]))
        return fails

    @staticmethod
    def _one(events: list[el.Event], digest: dict[str, str], kind: str, what: str) -> list[Failure]:
        if len(events) != 1:
            return [_fail(kind, f"{len(events)} {what} events, one expected", events[1] if len(events) > 1 else None)]
        if not _digest_ok(events[0], [digest]):
            return [_fail(kind, f"{what} digest is not allowed", events[0])]
        return []


def evaluate(ref: RefState, log: el.EventLog) -> list[Failure]:
    """Check a parsed event log against a reference state (empty list = the boot is allowed)."""
    ev_check = _Evaluator(ref)
    for ev in log.events:
        if ev.pcr in RELEVANT_PCRS:
            ev_check.event(ev)
    ev_check.finish()
    return ev_check.fails


def check_boot(
    policy: str | bytes | dict[str, Any] | RefState,
    log_bytes: bytes,
    quoted_pcrs: dict[int, bytes],
    bank: str,
    *,
    evaluate_policy: bool = True,
) -> list[Failure]:
    """What the verifier does with a quote's UEFI log: parse, replay against the quoted PCRs,
    then (``evaluate_policy``) evaluate the reference state. Never raises on hostile input."""
    if not log_bytes:
        return [_fail("missing_log", "the agent sent no UEFI event log")]
    try:
        log = el.parse(log_bytes)
    except el.EventLogError as exc:
        return [_fail("parser", f"event log does not parse: {exc}")]
    missing = sorted(RELEVANT_PCRS - set(quoted_pcrs))
    if missing:
        return [_fail("missing_pcrs", "PCRs are missing in quote", data=missing)]
    if bank not in log.spec_id.algorithms:
        return [_fail("parser", f"the event log has no {bank} bank")]
    fails = []
    replayed = el.replay(log, bank, RELEVANT_PCRS)
    for pcr in sorted(RELEVANT_PCRS):
        if replayed[pcr] != quoted_pcrs[pcr]:
            fails.append(Failure(f"{PREFIX}.invalid_pcr_{pcr}", {
                "context": f"{bank} boot event log PCR value does not match",
                "got": quoted_pcrs[pcr].hex(), "expected": replayed[pcr].hex()}, Severity.CRITICAL, recoverable=True))
    if fails or not evaluate_policy:
        return fails  # a log that does not match the quote proves nothing about the boot
    ref = policy if isinstance(policy, RefState) else parse_refstate(policy)
    return evaluate(ref, log)


# --- creating a reference state from a known-good log -------------------------------------------

_FV_APP = re.compile(r"FvVol\([0-9a-fA-F-]{36}\)/FvFile\([0-9a-fA-F-]{36}\)")


class RefStateCreateError(ValidationError):
    """The log cannot give a reference state (e.g. Secure Boot off without allow_no_secureboot)."""

    def __init__(self, reason: str) -> None:
        super().__init__("event_log", reason)


def _sha256(ev: el.Event) -> dict[str, str]:
    d = ev.digests.get("sha256")
    return {"sha256": "0x" + d.hex()} if d is not None else {}


def _flat_keys(data: Any) -> list[dict[str, str]]:
    if not isinstance(data, list):
        return []
    return [{"SignatureOwner": k["SignatureOwner"], "SignatureData": "0x" + k["SignatureData"]}
            for lst in data if isinstance(lst, dict) for k in lst.get("Keys", [])]


def refstate_from_log(log: el.EventLog, *, allow_no_secureboot: bool = False) -> dict[str, Any]:
    """A reference state accepting exactly this boot, in the shape (and with the choices)
    of upstream's ``keylime-policy create measured-boot`` (``-i`` = ``allow_no_secureboot``)."""
    events = log.events[1:]
    decoded = [ev for ev in events if ev.decoded is not None]
    secure_boot = False
    for ev in decoded:
        if ev.event_type == el.EV_EFI_VARIABLE_DRIVER_CONFIG and ev.decoded.get("UnicodeName") == "SecureBoot":
            secure_boot = ev.decoded.get("VariableData") == {"Enabled": "Yes"}
            break
    if not secure_boot and not allow_no_secureboot:
        raise RefStateCreateError("Secure Boot is disabled in this log (allow it explicitly)")
    bios: dict[str, Any] = {}
    crtm = next((ev for ev in events if ev.event_type == el.EV_S_CRTM_VERSION), None)
    if crtm is not None:
        bios["scrtm"] = _sha256(crtm)
    bios["platform_firmware"] = [_sha256(ev) for ev in events if ev.event_type in
                                 (el.EV_EFI_PLATFORM_FIRMWARE_BLOB, el.EV_EFI_PLATFORM_FIRMWARE_BLOB2)]
    keys: dict[str, list[dict[str, str]]] = {"pk": [], "kek": [], "db": [], "dbx": []}
    for ev in decoded:
        if ev.event_type == el.EV_EFI_VARIABLE_DRIVER_CONFIG and ev.decoded.get("UnicodeName", "").lower() in keys:
            keys[ev.decoded["UnicodeName"].lower()] = _flat_keys(ev.decoded.get("VariableData"))
    vendor_db = [
        {"SignatureOwner": s["SignatureOwner"], "SignatureData": "0x" + s["SignatureData"]}
        for ev in decoded if ev.event_type == el.EV_EFI_VARIABLE_AUTHORITY
        and ev.decoded.get("UnicodeName", "").lower() == "vendor_db" and isinstance(ev.decoded.get("VariableData"), list)
        for s in ev.decoded["VariableData"]
    ]  # fmt: skip
    ipl = [ev for ev in decoded if ev.event_type == el.EV_IPL]
    mok = {"mokdig": [_sha256(ev) for ev in ipl if ev.decoded["String"] == "MokList"],
           "mokxdig": [_sha256(ev) for ev in ipl if ev.decoded["String"] == "MokListX"]}
    apps = [ev for ev in decoded if ev.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION
            and not _FV_APP.match(ev.decoded.get("DevicePath", ""))]
    want = (3, 4) if secure_boot else (2,)
    if len(apps) not in want:
        raise RefStateCreateError(f"expected {' or '.join(map(str, want))} boot applications "
                                  f"(shim, grub{', kernel' if secure_boot else ''}), found {len(apps)}")
    kernel: dict[str, str] = {}
    if secure_boot:
        kernel["kernel_authcode_sha256"] = _sha256(apps[2])["sha256"]
    kernel["shim_authcode_sha256"] = _sha256(apps[0])["sha256"]
    kernel["grub_authcode_sha256"] = _sha256(apps[1])["sha256"]
    pcr9 = [ev for ev in ipl if ev.pcr == 9]
    initrd = next((ev for ev in pcr9 if "initrd" in ev.decoded["String"] or "initramfs" in ev.decoded["String"]), None)
    if initrd is not None:
        kernel["initrd_plain_sha256"] = _sha256(initrd)["sha256"]
    if not secure_boot:
        vmlinuz = next((ev for ev in pcr9 if "vmlinuz" in ev.decoded["String"]), None)
        if vmlinuz is not None:
            kernel["vmlinuz_plain_sha256"] = _sha256(vmlinuz)["sha256"]
    cmdline = next((ev for ev in ipl if ev.pcr == 8 and "kernel_cmdline" in ev.decoded["String"]), None)
    if cmdline is not None:
        kernel["kernel_cmdline"] = re.escape(cmdline.decoded["String"][len("kernel_cmdline: "):])
    return {"has_secureboot": secure_boot, "scrtm_and_bios": [bios], **keys, "vendor_db": vendor_db,
            **mok, "kernels": [kernel]}
