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
be of a kind the policy knows; SecureBoot must be as the policy says (and, wanted on, measured);
PK/KEK/db (and vendor_db) hold only allowed keys; dbx holds at least the listed entries (in any of
its signature lists); the PCR 4 boot applications are exactly shim, grub, kernel of one allowed
kernel entry (the kernel may be measured twice), with that entry's initrd (PCR 9) and kernel
command line (PCR 8); S-CRTM and firmware blobs (PCR 0) match one allowed ``scrtm_and_bios``
entry. Each failure is a :class:`~protocol.failures.Failure` ``measured_boot.<what>`` whose
context names the offending event (number, PCR, type). An empty reference state (``{}`` or empty
text) means "no measured-boot policy".

Before any rule reads event data, the data of the PCRs 0-9 and 14 is checked against its digests
(:func:`protocol.eventlog.data_mismatch`); data edited after the measurement gives only
``measured_boot.event_data_mismatch`` failures naming the events (upstream reads such data as it
is, so a flipped SecureBoot byte changes its verdict while the PCRs still replay).

**keytrio's extension, for real boots upstream's format cannot say** (every upstream reference
state means the same here; what upstream refuses as malformed gets a meaning):

* in a ``kernels`` entry, ``boot_applications: [{alg: 0xhex}, ...]`` is the exact PCR 4 chain
  (systemd-boot and a kernel or unified kernel image, one Windows boot manager, a chain with
  firmware UI applications, a SHA-1-format log), instead of the shim/grub/kernel keys;
  ``initrd``/``vmlinuz`` ({alg: 0xhex}) stand for ``initrd_plain_sha256``/``vmlinuz_plain_sha256``
  in logs without sha256; a missing ``initrd_plain_sha256``, ``kernel_cmdline`` or (without
  Secure Boot) ``vmlinuz_plain_sha256`` means the boot measured none, and no such event is allowed;
* a ``scrtm_and_bios`` entry without ``scrtm``: no EV_S_CRTM_VERSION event is allowed;
* ``pinned_events: [{"pcr", "event_type", "digests": {alg: 0xhex}}]``: events of kinds upstream's
  rules refuse (a POST code, a systemd-boot command line, a Windows boot event, a PCR 5 boot
  variable, ...) are allowed only as listed, each entry once and each one present
  (``measured_boot.pinned_event_missing`` otherwise).

:func:`refstate_from_log` writes upstream's format wherever it can say the boot.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keytrio.protocol import eventlog as el
from keytrio.protocol import safejson
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
        doc = safejson.loads(policy)
    except safejson.JsonError as exc:
        raise MbPolicyError("json", f"is not JSON ({exc.reason})") from None
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
        scrtm = entry.get("scrtm")
        bios.append((None if scrtm is None else _digest(scrtm, f"scrtm_and_bios[{i}].scrtm"),
                     [_digest(d, f"scrtm_and_bios[{i}].platform_firmware[{j}]")
                      for j, d in enumerate(entry["platform_firmware"])]))  # fmt: skip
    keys = {k: _sigs(doc, k) for k in ("pk", "kek", "db", "dbx")}
    keys["vendor_db"] = _sigs(doc, "vendor_db") if "vendor_db" in doc else set()
    mok = [_digest(d, f"mokdig[{i}]") for i, d in enumerate(_list(doc, "mokdig"))]
    mokx = [_digest(d, f"mokxdig[{i}]") for i, d in enumerate(_list(doc, "mokxdig"))]
    kernels = [_kernel(k, f"kernels[{i}]", sb) for i, k in enumerate(_list(doc, "kernels"))]
    pinned_doc = doc.get("pinned_events", [])
    if not isinstance(pinned_doc, list):
        raise MbPolicyError("pinned_events", "must be a list")
    pinned = [_pinned(e, f"pinned_events[{i}]") for i, e in enumerate(pinned_doc)]
    return RefState(sb, bios, keys, mok, mokx, kernels, doc, pinned)


def _plain(k: dict[str, Any], upstream_key: str, own_key: str, where: str) -> dict[str, str] | None:
    """A plain digest: upstream's ``<x>_plain_sha256`` hex, or keytrio's ``<x>`` {alg: hex}; None if neither."""
    if upstream_key in k and own_key in k:
        raise MbPolicyError(f"{where}.{own_key}", f"cannot be combined with {upstream_key}")
    if upstream_key in k:
        return {"sha256": _hex(k[upstream_key], f"{where}.{upstream_key}")}
    if own_key in k:
        return _digest(k[own_key], f"{where}.{own_key}")
    return None


def _kernel(k: object, where: str, sb: bool) -> Kernel:
    if not isinstance(k, dict):
        raise MbPolicyError(where, "must be an object")
    pattern = None
    if "kernel_cmdline" in k:
        cmdline = k["kernel_cmdline"]
        if not isinstance(cmdline, str):
            raise MbPolicyError(f"{where}.kernel_cmdline", "must be a string (regular expression)")
        try:
            pattern = re.compile("kernel_cmdline: " + cmdline)
        except re.error as exc:
            raise MbPolicyError(f"{where}.kernel_cmdline", f"is not a regular expression ({exc})") from None
    initrd = _plain(k, "initrd_plain_sha256", "initrd", where)
    vmlinuz = _plain(k, "vmlinuz_plain_sha256", "vmlinuz", where)
    if "boot_applications" in k:
        apps = k["boot_applications"]
        if not isinstance(apps, list):  # [] is a boot that ran no boot application (a partial log)
            raise MbPolicyError(f"{where}.boot_applications", "must be a list of {algorithm: 0xhex}")
        for key in ("shim_authcode_sha256", "grub_authcode_sha256", "kernel_authcode_sha256"):
            if key in k:
                raise MbPolicyError(f"{where}.{key}", "cannot be combined with boot_applications")
        return Kernel(None, None, None, vmlinuz, initrd, pattern,
                      [_digest(d, f"{where}.boot_applications[{j}]") for j, d in enumerate(apps)])
    return Kernel(
        shim=_hex(k.get("shim_authcode_sha256"), f"{where}.shim_authcode_sha256"),
        grub=_hex(k.get("grub_authcode_sha256"), f"{where}.grub_authcode_sha256"),
        kernel=_hex(k.get("kernel_authcode_sha256"), f"{where}.kernel_authcode_sha256") if sb else None,
        vmlinuz=None if sb else vmlinuz, initrd=initrd, cmdline=pattern,
    )


_TYPES_BY_NAME = {name: value for value, name in el.EVENT_TYPE_NAMES.items()}


def _pinned(e: object, where: str) -> tuple[int, int, dict[str, str]]:
    if not isinstance(e, dict):
        raise MbPolicyError(where, "must be {pcr, event_type, digests}")
    pcr = e.get("pcr")
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= 31:
        raise MbPolicyError(f"{where}.pcr", "must be a PCR index 0-31")
    name = e.get("event_type")
    etype = _TYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if etype is None and isinstance(name, str) and re.fullmatch(r"0x[0-9a-f]{8}", name):
        etype = int(name, 16)
    if etype is None:
        raise MbPolicyError(f"{where}.event_type", "must be an event type name (EV_...) or 0x + 8 hex digits")
    return pcr, etype, _digest(e.get("digests"), f"{where}.digests")


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
        self.pinned = list(enumerate(ref.pinned))  # not yet matched by an event

    def unexpected(self, reason: str, ev: el.Event) -> None:
        """An event of a kind the policy has no rule for: allowed only as one of its pinned events."""
        for i, (_n, (pcr, etype, digest)) in enumerate(self.pinned):
            if pcr == ev.pcr and etype == ev.event_type and _digest_ok(ev, [digest]):
                del self.pinned[i]
                return
        self.fail("unexpected_event", reason, ev)

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
                self.unexpected(f"EV_EFI_ACTION {text!r} not expected in PCR {pcr}", ev)
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
                self.unexpected(f"boot variable {var['UnicodeName']} not expected", ev)
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
                self.unexpected("PCR 8 EV_IPL is neither grub_cmd nor kernel_cmdline", ev)
        elif pcr == 9 and t == el.EV_IPL:
            text = ev.decoded["String"]
            kind = _pcr9_kind(text)
            if kind == "vmlinuz":
                self.vmlinuz.append(ev)
            elif kind == "initrd":
                self.initrds.append(ev)
            elif kind == "other":
                self.unexpected(f"PCR 9 file {text!r} is not grub's, a kernel or an initrd", ev)
        elif pcr == 14 and t == el.EV_IPL:
            self.mok(ev)
        else:
            self.unexpected(f"{ev.type_name} in PCR {pcr} is not allowed by the policy", ev)

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
                return _fail("scrtm_bios_not_allowed", "an EV_S_CRTM_VERSION event where the policy has none",
                             self.crtm[0])
        elif len(self.crtm) != 1:
            return _fail("scrtm_bios_not_allowed", f"{len(self.crtm)} EV_S_CRTM_VERSION events, one expected",
                         self.crtm[1] if len(self.crtm) > 1 else None)
        elif not _digest_ok(self.crtm[0], [scrtm]):
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
                fails.append(_fail("boot_application_not_allowed",
                                   f"boot application #{i} is one more than the policy's chain", ev))
                break
            if not _digest_ok(ev, [want[i][1]]):
                fails.append(_fail("boot_application_not_allowed",
                                   f"boot application #{i} ({want[i][0]} expected) has no allowed digest", ev))
                break
        else:
            if len(self.apps) < len(want):
                fails.append(_fail("boot_application_not_allowed",
                                   f"boot chain ends before the {want[len(self.apps)][0]} "
                                   f"({len(self.apps)} of {len(want)})", self.apps[-1] if self.apps else None))
        fails += self._one(self.initrds, k.initrd, "initrd_not_allowed", "initrd")
        if not self.ref.has_secureboot:
            fails += self._one(self.vmlinuz, k.vmlinuz, "kernel_not_allowed", "vmlinuz")
        elif len(self.vmlinuz) > 1:
            fails.append(_fail("kernel_not_allowed", "more than one vmlinuz read by grub", self.vmlinuz[1]))
        if k.cmdline is None:
            if self.cmdlines:
                fails.append(_fail("kernel_cmdline_not_allowed", "a kernel_cmdline event where the policy has none",
                                   self.cmdlines[0]))
        elif len(self.cmdlines) != 1:
            fails.append(_fail("kernel_cmdline_not_allowed", f"{len(self.cmdlines)} kernel_cmdline events",
                               self.cmdlines[1] if len(self.cmdlines) > 1 else None))
        elif not k.cmdline.fullmatch(self.cmdlines[0].decoded["String"]):
            fails.append(_fail("kernel_cmdline_not_allowed", "kernel command line is not allowed", self.cmdlines[0],
                               cmdline=self.cmdlines[0].decoded["String"][len("kernel_cmdline: "):]))
        return fails

    @staticmethod
    def _one(events: list[el.Event], digest: dict[str, str] | None, kind: str, what: str) -> list[Failure]:
        if digest is None:  # the policy's boot measured none
            return [_fail(kind, f"a {what} event where the policy has none", events[0])] if events else []
        if len(events) != 1:
            return [_fail(kind, f"{len(events)} {what} events, one expected", events[1] if len(events) > 1 else None)]
        if not _digest_ok(events[0], [digest]):
            return [_fail(kind, f"{what} digest is not allowed", events[0])]
        return []


def unbound_data(log: el.EventLog) -> list[Failure]:
    """One ``event_data_mismatch`` failure per event (of the PCRs a policy reads) whose data is not
    what its digests measured: edited after the measurement, so no rule may read it. Events of
    other PCRs are not checked: their digests are not compared with the quote either."""
    return [_fail("event_data_mismatch", reason, ev) for ev, reason in el.unbound_events(log)
            if ev.pcr in RELEVANT_PCRS]


def evaluate(ref: RefState, log: el.EventLog) -> list[Failure]:
    """Check a parsed event log against a reference state (empty list = the boot is allowed).

    Event data is first checked against its digests (:func:`unbound_data`); a log with edited
    data gets only those failures, since every rule below would read what an attacker wrote."""
    forged = unbound_data(log)
    if forged:
        return forged
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
    if bank not in log.algorithms:
        return [_fail("parser", f"the event log has no {bank} bank")]
    fails = []
    try:
        replayed = el.replay(log, bank, RELEVANT_PCRS)
    except el.EventLogError as exc:  # an event without a digest of this bank, an unknown hash
        return [_fail("parser", f"the event log cannot be replayed in {bank}: {exc}")]
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

_POLICY_BANKS = ("sha256", "sha384", "sha512", "sha1", "sm3_256")  # the digest the policy pins, best first


class RefStateCreateError(ValidationError):
    """The log cannot give a reference state (e.g. Secure Boot off without allow_no_secureboot);
    the reason names the event."""

    def __init__(self, reason: str) -> None:
        super().__init__("event_log", reason)


def _flat_keys(data: Any) -> list[dict[str, str]]:
    if not isinstance(data, list):
        return []
    return [{"SignatureOwner": k["SignatureOwner"], "SignatureData": "0x" + k["SignatureData"]}
            for lst in data if isinstance(lst, dict) for k in lst.get("Keys", [])]


def _policy_bank(log: el.EventLog) -> str:
    """sha256 when every relevant event has it (upstream's choice), else the best complete bank."""
    reasons = []
    for bank in _POLICY_BANKS:
        if bank not in log.algorithms:
            continue
        gaps = {p: ev for p, ev in el.incomplete_pcrs(log, bank).items() if p in RELEVANT_PCRS}
        if not gaps:
            return bank
        reasons.append(f"{gaps[min(gaps)].where()} has no {bank} digest")
    raise RefStateCreateError("no bank of the log has a digest in every event of PCRs 0-9 and 14"
                              + (f" ({'; '.join(reasons)})" if reasons else ""))


def _pcr9_kind(text: str) -> str:
    """What grub read, by its path (upstream's rules): grub's own files, a kernel, an initrd, other."""
    if "/loader/entries" in text or "/grub" in text:
        return "grub"
    if "/vmlinuz" in text:
        return "vmlinuz"
    if "/initrd" in text or "/initramfs" in text:
        return "initrd"
    return "other"


class _Collector(_Evaluator):
    """Runs the rules on the known-good log and keeps the events no rule covers (to pin them)."""

    def __init__(self, ref: RefState) -> None:
        super().__init__(ref)
        self.unknown: list[el.Event] = []

    def unexpected(self, reason: str, ev: el.Event) -> None:
        self.unknown.append(ev)


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
    bank = _policy_bank(log)

    def dig(ev: el.Event) -> dict[str, str]:
        return {bank: "0x" + ev.digests[bank].hex()}

    def of(pcr: int, *types: int) -> list[el.Event]:
        return [ev for ev in log.events if ev.pcr == pcr and ev.event_type in types]

    variables = [ev for ev in of(7, el.EV_EFI_VARIABLE_DRIVER_CONFIG) if isinstance(ev.decoded, dict)]
    sb_event = next((ev for ev in variables if ev.decoded.get("UnicodeName") == "SecureBoot"), None)
    secure_boot = sb_event is not None and sb_event.decoded.get("VariableData") == {"Enabled": "Yes"}
    if not secure_boot and not allow_no_secureboot:
        where = "no SecureBoot variable is measured" if sb_event is None else f"{sb_event.where()} says so"
        raise RefStateCreateError(f"Secure Boot is disabled in this log ({where}); allow it explicitly "
                                  "(-i/--without-secureboot) for a measured-boot-only policy")
    bios: dict[str, Any] = {}
    crtm = of(0, el.EV_S_CRTM_VERSION)
    if crtm:
        bios["scrtm"] = dig(crtm[0])
    bios["platform_firmware"] = [dig(ev) for ev in of(0, el.EV_EFI_PLATFORM_FIRMWARE_BLOB,
                                                      el.EV_EFI_PLATFORM_FIRMWARE_BLOB2)]
    keys: dict[str, list[dict[str, str]]] = {"pk": [], "kek": [], "db": [], "dbx": []}
    for ev in variables:
        if ev.decoded.get("UnicodeName", "").lower() in keys:
            keys[ev.decoded["UnicodeName"].lower()] = _flat_keys(ev.decoded.get("VariableData"))
    vendor_db = [
        {"SignatureOwner": s["SignatureOwner"], "SignatureData": "0x" + s["SignatureData"]}
        for ev in of(7, el.EV_EFI_VARIABLE_AUTHORITY) if isinstance(ev.decoded, dict)
        and ev.decoded.get("UnicodeName", "").lower() == "vendor_db" and isinstance(ev.decoded.get("VariableData"), list)
        for s in ev.decoded["VariableData"]
    ]  # fmt: skip
    mok_ipl = [ev for ev in of(14, el.EV_IPL) if isinstance(ev.decoded, dict)]
    mok = {"mokdig": [dig(ev) for ev in mok_ipl if ev.decoded["String"] == "MokList"],
           "mokxdig": [dig(ev) for ev in mok_ipl if ev.decoded["String"] == "MokListX"]}
    ref: dict[str, Any] = {"has_secureboot": secure_boot, "scrtm_and_bios": [bios], **keys, "vendor_db": vendor_db,
                           **mok, "kernels": [_kernel_entry(log, bank, secure_boot, dig)]}
    collector = _Collector(parse_refstate(ref))
    for ev in log.events:
        if ev.pcr in RELEVANT_PCRS:
            collector.event(ev)
    if collector.unknown:
        ref["pinned_events"] = [{"pcr": ev.pcr, "event_type": ev.type_name, "digests": dig(ev)}
                                for ev in collector.unknown]
    fails = evaluate(parse_refstate(ref), log)
    if fails:
        ctx = fails[0].context
        where = f" at event {ctx['event']} (PCR {ctx['pcr']}, {ctx['event_type']})" if "event" in ctx else ""
        raise RefStateCreateError(f"the measured-boot rules refuse this boot{where}: {ctx['reason']} "
                                  f"({fails[0].event_id})")
    return ref


def _kernel_entry(log: el.EventLog, bank: str, secure_boot: bool, dig: Callable[[el.Event], dict[str, str]],
                  ) -> dict[str, Any]:
    """The boot's kernels[] entry: upstream's keys when its tool would write them (sha256 digests,
    a chain of 3 or 4 applications with Secure Boot, 2 without: shim, grub (, kernel) by position),
    keytrio's ``boot_applications`` (and ``initrd``/``vmlinuz`` digests) otherwise; a key is left
    out when this boot measured no such thing."""
    apps = [ev for ev in log.events if ev.pcr == 4 and ev.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION]
    ipl = [ev for ev in log.events if ev.event_type == el.EV_IPL and isinstance(ev.decoded, dict)]
    kernel: dict[str, Any] = {}
    upstream = bank == "sha256" and (
        (secure_boot and (len(apps) == 3 or (len(apps) == 4 and apps[3].digests == apps[2].digests)))
        or (not secure_boot and len(apps) == 2))
    if upstream:
        if secure_boot:
            kernel["kernel_authcode_sha256"] = dig(apps[2])[bank]
        kernel["shim_authcode_sha256"] = dig(apps[0])[bank]
        kernel["grub_authcode_sha256"] = dig(apps[1])[bank]
    else:
        kernel["boot_applications"] = [dig(ev) for ev in apps]
    pcr9 = [ev for ev in ipl if ev.pcr == 9]
    initrd = next((ev for ev in pcr9 if _pcr9_kind(ev.decoded["String"]) == "initrd"), None)
    if initrd is not None:
        kernel.update({"initrd_plain_sha256": dig(initrd)[bank]} if bank == "sha256" else {"initrd": dig(initrd)})
    vmlinuz = next((ev for ev in pcr9 if _pcr9_kind(ev.decoded["String"]) == "vmlinuz"), None)
    if not secure_boot and vmlinuz is not None:
        kernel.update({"vmlinuz_plain_sha256": dig(vmlinuz)[bank]} if bank == "sha256" else {"vmlinuz": dig(vmlinuz)})
    cmdline = next((ev for ev in ipl if ev.pcr == 8 and ev.decoded["String"].startswith("kernel_cmdline: ")), None)
    if cmdline is not None:
        kernel["kernel_cmdline"] = re.escape(cmdline.decoded["String"][len("kernel_cmdline: "):])
    return kernel
