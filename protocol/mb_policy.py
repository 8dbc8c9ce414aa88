"""Measured-boot policy: the reference state ``keylime-policy create measured-boot`` writes (its
format and validation, :func:`parse_refstate`) and the verifier's one call, :func:`check_boot`
(parse the UEFI log, replay it against the quoted PCRs, evaluate). The rules themselves are in
:mod:`protocol.mb_rules`; a reference state from a known-good log is :mod:`protocol.mb_create`.

Reference state (JSON object; hex values are ``0x`` + lowercase hex)::

    {"has_secureboot": true,
     "scrtm_and_bios": [{"scrtm": {"sha256": "0x.."}, "platform_firmware": [{"sha256": "0x.."}, ...]}],
     "pk": [{"SignatureOwner": uuid, "SignatureData": "0x.."}], "kek": [...], "db": [...],
     "dbx": [...], "vendor_db": [...] (optional), "mokdig": [{"sha256": ..}], "mokxdig": [...],
     "kernels": [{"shim_authcode_sha256", "grub_authcode_sha256", "kernel_authcode_sha256"
                  (or "vmlinuz_plain_sha256" without Secure Boot), "initrd_plain_sha256",
                  "kernel_cmdline" (a regular expression)}]}

An empty reference state (``{}`` or empty text) means "no measured-boot policy".

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

:func:`protocol.mb_create.refstate_from_log` writes upstream's format wherever it can say the boot.
"""

from __future__ import annotations

import re
from typing import Any

from keytrio.protocol import eventlog as el
from keytrio.protocol import eventlog_parse, eventlog_replay, safejson
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.mb_rules import PREFIX, RELEVANT_PCRS, Kernel, RefState, evaluate, mb_failure

#: PCRs the verifier asks for when an agent has an mb policy (upstream's MEASUREDBOOT_PCRS)
MEASUREDBOOT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15)
_HEX = re.compile(r"0x[0-9a-f]+")


class MbPolicyError(ValidationError):
    """The reference state is not one this evaluator understands (``field`` names the part)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"mb_policy.{field}", reason)


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


# --- the verifier's call --------------------------------------------------------------------------


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
        return [mb_failure("missing_log", "the agent sent no UEFI event log")]
    try:
        log = eventlog_parse.parse(log_bytes)
    except el.EventLogError as exc:
        return [mb_failure("parser", f"event log does not parse: {exc}")]
    missing = sorted(RELEVANT_PCRS - set(quoted_pcrs))
    if missing:
        return [mb_failure("missing_pcrs", "PCRs are missing in quote", data=missing)]
    if bank not in log.algorithms:
        return [mb_failure("parser", f"the event log has no {bank} bank")]
    fails = []
    try:
        replayed = eventlog_replay.replay(log, bank, RELEVANT_PCRS)
    except el.EventLogError as exc:  # an event without a digest of this bank, an unknown hash
        return [mb_failure("parser", f"the event log cannot be replayed in {bank}: {exc}")]
    for pcr in sorted(RELEVANT_PCRS):
        if replayed[pcr] != quoted_pcrs[pcr]:
            fails.append(Failure(f"{PREFIX}.invalid_pcr_{pcr}", {
                "context": f"{bank} boot event log PCR value does not match",
                "got": quoted_pcrs[pcr].hex(), "expected": replayed[pcr].hex()}, Severity.CRITICAL, recoverable=True))
    if fails or not evaluate_policy:
        return fails  # a log that does not match the quote proves nothing about the boot
    ref = policy if isinstance(policy, RefState) else parse_refstate(policy)
    return evaluate(ref, log)


