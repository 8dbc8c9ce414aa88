"""``POST /v2.x/verify/evidence`` and ``GET /v2.x/verify/identity`` (public routes).

Evidence is checked with the monitor's own code (protocol.evidence.verify + an AgentIma check
starting from progress zero), minus the clock and PCR 16 checks, which need per-agent history and
an NK. Evidence whose quote signature, nonce or PCR digest does not verify is never valid: the
quote failures are in the list, and the IMA hook does not even run then.

Missing inputs -> :class:`EvidenceRejected` (HTTP 400), in upstream's shape: one failure
``{"type": "default.missing_param", "context": {"message": ..., "params": [names]}}`` for the
required inputs (nonce, quote, hash_alg, tpm_ak, and tpm_ek, which upstream requires though no
check uses it), ``default.missing_policy`` when no policy at all is given; unusable inputs (a tpm_ak
that does not decode, a runtime_policy that does not validate, ...) get ``<field>.invalid_param``.
A runtime policy with an empty IMA list is evaluated (as upstream does): the replay of nothing
must then match PCR 10. Every IMA line presented is judged against the policy, also the lines
after the one the quoted PCR 10 matches (upstream does the same; the loop leaves them to the next
quote). The nonce is the quote's extraData as raw text or as base64 of it: upstream's checkquote
tries the raw UTF-8 bytes first, then its lenient base64 decoding.
Measured boot: a non-empty ``mb_policy`` (reference state as JSON text or object) needs ``mb_log``
(base64 of the binary UEFI event log); the log is replayed against the quoted PCRs and evaluated
(``measured_boot.*`` failures). An ``mb_policy`` that does not validate -> ``mb_policy.invalid_param``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from typing import Any

from keytrio.actors.verifier.ima import AgentIma, FixedPolicy
from keytrio.actors.verifier.mbpolicies import canonical as canonical_mb
from keytrio.actors.verifier.policies import PolicyRefused, parse
from keytrio.protocol import mb_policy, safejson, tpm2, validation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.evidence import Evidence, Expectations, RefStateCheck, verify
from keytrio.protocol.failures import Failure
from keytrio.protocol.runtime_policy import RuntimePolicy

EVIDENCE_FIELDS = (
    "nonce", "quote", "hash_alg", "tpm_ak", "tpm_ek", "tpm_policy", "runtime_policy", "mb_policy",
    "ima_measurement_list", "mb_log",
)  # fmt: skip
REQUIRED = ("nonce", "quote", "hash_alg", "tpm_ak")
#: upstream refuses evidence without tpm_ek (the key must be there; no check reads it)
PRESENT = ("tpm_ek",)
POLICIES = ("tpm_policy", "runtime_policy", "mb_policy")
IDENTITY_PARAMS = ("agent_uuid", "quote", "nonce", "hash_alg")


#: Parsed runtime policies of recent requests, by SHA-256 of the policy bytes: callers that check
#: many quotes against one policy (a fleet's shared policy) pay its parse once. Bounded in entries
#: and in the size of a policy worth keeping; only policies that parsed are kept (a refused one is
#: parsed again and refused again, with the same failure).
POLICY_CACHE_ENTRIES = 4
POLICY_CACHE_MAX_BYTES = 2 << 20  # ~20,000 files; the route is public: what it keeps stays small
_policy_cache: dict[bytes, RuntimePolicy] = {}


def _parsed_policy(raw: bytes) -> RuntimePolicy:
    """``parse(raw)`` through the cache (thread-safe enough: a race parses twice, nothing worse)."""
    if len(raw) > POLICY_CACHE_MAX_BYTES:
        return parse(raw, None, require_signature=False)
    key = hashlib.sha256(raw).digest()
    policy = _policy_cache.pop(key, None)
    if policy is None:
        policy = parse(raw, None, require_signature=False)
    _policy_cache[key] = policy  # (re)inserted last: dicts keep insertion order, so oldest first
    while len(_policy_cache) > POLICY_CACHE_ENTRIES:
        try:
            del _policy_cache[next(iter(_policy_cache))]
        except (KeyError, StopIteration, RuntimeError):  # another thread changed it meanwhile
            break
    return policy


class EvidenceRejected(Exception):
    """The request cannot be evaluated (400); ``failures`` in the response's shape."""

    def __init__(self, failures: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f["type"] for f in failures))
        self.failures = failures


def missing_param(name: str) -> dict[str, Any]:
    return {"type": f"{name}.missing_param", "context": {"message": f"missing parameter: {name}"}}


def missing_params(names: list[str]) -> dict[str, Any]:
    """Upstream names every missing required input ``default.missing_param``; the context lists them."""
    return {"type": "default.missing_param",
            "context": {"message": f"missing parameter(s): {', '.join(names)}", "params": names}}


def invalid_param(name: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"{name}.invalid_param", "context": {"message": message, **extra}}


def failure_json(f: Failure) -> dict[str, Any]:
    return {"type": f.event_id, "context": f.context}


def _given(data: dict[str, Any], name: str) -> bool:
    value = data.get(name)
    return value is not None and value != "" and value != {}


def _runtime_policy_bytes(value: object) -> bytes:
    """The policy as sent: JSON text (upstream's doc), a JSON object, or base64 of JSON."""
    if isinstance(value, dict):
        return json.dumps(value).encode()
    if not isinstance(value, str):
        raise EvidenceRejected([invalid_param("runtime_policy", "must be JSON text or base64 of it")])
    if value.lstrip().startswith("{"):
        return value.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceRejected([invalid_param("runtime_policy", "must be JSON text or base64 of it")]) from None


def _tpm_policy(value: object) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    doc = value
    if isinstance(value, str):
        try:
            doc = safejson.loads(value)
        except safejson.JsonError as exc:
            raise EvidenceRejected([invalid_param("tpm_policy", f"is not valid JSON: {exc.reason}")]) from None
    try:
        return validation.tpm_policy(doc, require_mask=False)
    except ValidationError as exc:
        raise EvidenceRejected([invalid_param("tpm_policy", exc.reason)]) from None


@functools.lru_cache(maxsize=256)
def _ak_of(value: str) -> tpm2.AkKey:
    # parsing a TPM2B_PUBLIC costs more than checking the quote; a client checks many quotes of
    # one AK (bounded; failures are not cached: they raise)
    return tpm2.ak_key(base64.b64decode(value, validate=True))


def _ak(value: object, field: str = "tpm_ak") -> tpm2.AkKey:
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        if len(value) > 4096:  # no TPM2B_PUBLIC is this long; not worth a cache slot either
            return tpm2.ak_key(base64.b64decode(value, validate=True))
        return _ak_of(value)
    except (binascii.Error, ValueError, ProtocolError) as exc:
        raise EvidenceRejected([invalid_param(field, f"not a usable AK (base64 TPM2B_PUBLIC): {exc}")]) from None


def inline_size(data: object) -> int:
    """Characters of the parts of ``data`` whose checking cost grows with their size (the IMA
    list, an inline runtime policy, the measured-boot log and policy); 0 when not a dict."""
    if not isinstance(data, dict):
        return 0
    size = 0
    for name in ("ima_measurement_list", "runtime_policy", "mb_log", "mb_policy"):
        value = data.get(name)
        if isinstance(value, str):
            size += len(value)
        elif value:  # an object (a policy given as JSON): no cheap size; assume large
            return 1 << 62
    return size


def check_tpm_evidence(data: object, *, ignore_tomtou_errors: bool = False) -> list[Failure]:
    """Failures of TPM evidence (empty = valid); EvidenceRejected for missing/unusable inputs."""
    if not isinstance(data, dict):
        raise EvidenceRejected([missing_param("data")])
    missing = [n for n in REQUIRED if not _given(data, n)] + [n for n in PRESENT if n not in data]
    problems = [missing_params(missing)] if missing else []
    if not missing and not any(_given(data, n) for n in POLICIES):
        problems.append({"type": "default.missing_policy",
                         "context": {"message": "give at least one of tpm_policy, runtime_policy, mb_policy"}})
    for n in REQUIRED:
        if _given(data, n) and not isinstance(data[n], str):
            problems.append(invalid_param(n, "must be a string"))
    has_runtime = _given(data, "runtime_policy")
    if _given(data, "ima_measurement_list") and not isinstance(data["ima_measurement_list"], str):
        problems.append(invalid_param("ima_measurement_list", "must be a string"))
    mb_ref = None
    mb_log = b""
    if _given(data, "mb_policy"):
        try:
            text = canonical_mb(data["mb_policy"])
            mb_ref = mb_policy.parse_refstate(text) if text is not None else None
        except PolicyRefused as exc:
            problems.append(invalid_param("mb_policy", exc.reason, field=exc.field))
        if mb_ref is not None and not _given(data, "mb_log"):
            problems.append(missing_param("mb_log"))
        elif mb_ref is not None:
            try:
                if not isinstance(data["mb_log"], str):
                    raise ValueError("not a string")
                mb_log = base64.b64decode(data["mb_log"], validate=True)
            except (binascii.Error, ValueError):
                problems.append(invalid_param("mb_log", "must be base64 of the binary UEFI event log"))
    if problems:
        raise EvidenceRejected(problems)

    ak = _ak(data["tpm_ak"])
    if data["hash_alg"] not in tpm2.HASH_ALGS:
        # upstream's id for it; the quote is never valid without a known hash
        return [Failure("qoute_validation.invalid_hash_alg",
                        {"message": "unsupported hash_alg", "hash_alg": str(data["hash_alg"])[:32]})]
    tpm_policy = _tpm_policy(data.get("tpm_policy"))
    hook = None
    if has_runtime:
        try:
            policy = _parsed_policy(_runtime_policy_bytes(data["runtime_policy"]))
        except PolicyRefused as exc:
            raise EvidenceRejected([invalid_param("runtime_policy", exc.reason, field=exc.field)]) from None
        hook = AgentIma("evidence", FixedPolicy(policy), None, policy.checksum,
                        ignore_tomtou_errors=ignore_tomtou_errors, check_unquoted=True)
    expect = Expectations(
        ak=ak,
        nonce=data["nonce"],
        nonce_base64=True,
        tpm_policy=tpm_policy,
        check_clock=False,  # PCR 16 binding (nk_pem) and the clock need a monitored agent's history
        ima=hook,
        measured_boot=RefStateCheck(mb_ref) if mb_ref is not None else None,
    )
    evidence = Evidence(data["quote"], data["hash_alg"], ima_list=data.get("ima_measurement_list") or "",
                        mb_log=mb_log)
    return verify(expect, evidence).failures


def valid_value(valid: bool, api_version: str) -> bool | int:
    """``valid`` is a bool from API 2.5 on, 1/0 before (upstream's change log)."""
    if tuple(int(p) for p in api_version.split(".")) >= (2, 5):
        return valid
    return 1 if valid else 0


def check_identity(row: dict[str, Any], quote: str, nonce: str, hash_alg: str) -> list[Failure]:
    """``/verify/identity``: the quote verifies with the enrolled agent's AK (no clock/PCR 16)."""
    ak = _ak(row["ak_tpm"], "agent_uuid")
    expect = Expectations(
        ak=ak,
        nonce=nonce,
        nonce_base64=True,
        accepted_hash_algs=tuple(json.loads(row["accept_tpm_hash_algs"])),
        accepted_sign_algs=tuple(json.loads(row["accept_tpm_signing_algs"])),
        check_clock=False,
    )
    return verify(expect, Evidence(quote, hash_alg)).failures
