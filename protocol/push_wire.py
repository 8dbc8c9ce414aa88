"""The JSON:API documents of the push model (API v3.0): sessions and attestations. Pure.

Parsers take the decoded request body and return typed values, or raise :class:`WireError`
carrying the HTTP status (400 for a body that is not the document asked for, 422 for
capabilities/evidence that are well-formed but unusable) and a detail that names the member.
Builders return the response documents. Shapes are upstream 7.14.3's where it and its docs
differ only in form, and both are accepted where we can (``available_subjects`` as
``{bank: [pcrs]}`` or the documented flat list; ``subject_data`` as base64 of the tpm2-tools
PCR blob or the documented ``{"<pcr>": "<hex>"}`` object).
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keytrio.protocol import pcr_blob, tpm2, validation
from keytrio.protocol import quote as tpm_quote
from keytrio.protocol.errors import ProtocolError

JSONAPI = {"version": "1.1"}
MAX_PCR = validation.MAX_PCR
CERTIFICATION, LOG = "certification", "log"
TPM_QUOTE, IMA_LOG, UEFI_LOG = "tpm_quote", "ima_log", "uefi_log"
POP_CLASS, POP_TYPE = "pop", "tpm_pop"
_MAX_LIST = 64  # items in any capabilities list (algorithms, keys, evidence items)
_MAX_B64 = 1 << 16  # TPMS_ATTEST / TPMT_SIGNATURE / PCR blob text: a few KB at most
_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           410: "Gone", 413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class WireError(ProtocolError):
    """A request the v3 API refuses: ``status`` (HTTP), ``detail`` (no secrets), optional ``code``
    and ``retry_after`` (seconds, for 429/503)."""

    def __init__(self, status: int, detail: str, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code
        self.retry_after = retry_after


def error_document(status: int, detail: str, code: str | None = None) -> dict[str, Any]:
    """``{"errors": [{"status", "title", "detail"[, "code"]}]}`` (status as a string, JSON:API)."""
    err: dict[str, Any] = {"status": str(status), "title": _TITLES.get(status, "Error"), "detail": detail}
    if code is not None:
        err["code"] = code
    return {"errors": [err]}


#: epoch -> its timestamp() text: an attestation's times are rendered again and again (the 201's
#: two in the 202, evidence_received_at = verification_completed_at); cleared when full
_STAMPS: dict[float, str] = {}
_MAX_STAMPS = 4096


def timestamp(epoch: float | None) -> str | None:
    """ISO 8601 UTC with microseconds, as upstream renders its times (None stays None)."""
    if epoch is None:
        return None
    text = _STAMPS.get(epoch)
    if text is not None:
        return text
    dt = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    if dt.year >= 1000:
        # the same text as the strftime below ("+00:00" cut), at half its cost; strftime's %Y does
        # not pad a year below 1000 to four digits, isoformat does
        text = dt.isoformat(timespec="microseconds")[:-6] + "Z"
    else:
        text = dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
    if len(_STAMPS) >= _MAX_STAMPS:
        _STAMPS.clear()
    _STAMPS[epoch] = text
    return text


def timestamp_general(epoch: float | None) -> str | None:
    """:func:`timestamp` as it was written first (strftime, no memo): the reference its tests
    compare against."""
    if epoch is None:
        return None
    dt = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# --- generic members -------------------------------------------------------------------------------


def _attributes(doc: object, kind: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise WireError(400, "the body must be a JSON:API document with a 'data' object")
    data = doc["data"]
    if data.get("type") != kind:
        raise WireError(400, f"data.type must be {kind!r}")
    attrs = data.get("attributes")
    if not isinstance(attrs, dict):
        raise WireError(400, "data.attributes must be an object")
    return attrs


def _list(value: object, where: str, *, status: int = 400, min_len: int = 0) -> list[Any]:
    if not isinstance(value, list) or len(value) > _MAX_LIST or len(value) < min_len:
        more = f", {min_len}-{_MAX_LIST} items" if min_len else f", at most {_MAX_LIST} items"
        raise WireError(status, f"{where} must be a list{more}")
    return value


def _names(value: object, where: str) -> list[str]:
    items = _list(value, where, status=422, min_len=1)
    if not all(isinstance(v, str) and 0 < len(v) <= 32 for v in items):
        raise WireError(422, f"{where} must list names (strings)")
    return [v.lower() for v in items]


def _int(value: object, where: str, lo: int = 0, hi: int = (1 << 63) - 1, status: int = 400) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(status, f"{where} must be an integer {lo}-{hi}")
    return value


def _b64(value: object, where: str, limit: int = _MAX_B64) -> bytes:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise WireError(400, f"{where} must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(400, f"{where} is not base64") from None


def agent_id_of(value: object, where: str = "data.attributes.agent_id") -> str:
    try:
        return validation.agent_id(value, where)
    except ProtocolError as exc:
        raise WireError(400, str(exc)) from None


# --- sessions --------------------------------------------------------------------------------------


def parse_session_request(doc: object) -> str:
    """``POST /sessions``: the agent id (tpm_pop must be among ``authentication_supported``)."""
    attrs = _attributes(doc, "session")
    agent_id = agent_id_of(attrs.get("agent_id"))
    methods = _list(attrs.get("authentication_supported"), "data.attributes.authentication_supported", min_len=1)
    if not any(isinstance(m, dict) and m.get("authentication_class") == POP_CLASS
               and m.get("authentication_type") == POP_TYPE for m in methods):
        raise WireError(422, "authentication_supported must offer pop/tpm_pop")
    return agent_id


@dataclass(frozen=True)
class PopProof:
    agent_id: str
    message: bytes
    signature: bytes


def parse_session_proof(doc: object) -> PopProof:
    """``PATCH /sessions/{id}``: the TPM2_Certify attest and signature the agent provides."""
    attrs = _attributes(doc, "session")
    agent_id = agent_id_of(attrs.get("agent_id"))
    provided = _list(attrs.get("authentication_provided"), "data.attributes.authentication_provided", min_len=1)
    for item in provided:
        if isinstance(item, dict) and item.get("authentication_class") == POP_CLASS \
                and item.get("authentication_type") == POP_TYPE:
            data = item.get("data")
            if not isinstance(data, dict):
                raise WireError(400, "authentication_provided[].data must be an object")
            return PopProof(agent_id, _b64(data.get("message"), "data.message"),
                            _b64(data.get("signature"), "data.signature"))
    raise WireError(422, "authentication_provided has no pop/tpm_pop item")


def _pop_method(challenge_b64: str) -> dict[str, Any]:
    return {"authentication_class": POP_CLASS, "authentication_type": POP_TYPE,
            "chosen_parameters": {"challenge": challenge_b64}}


def session_document(
    session_id: str, agent_id: str, challenge_b64: str, created_at: float, expires_at: float, *,
    evaluation: str | None = None, token: str | None = None, token_expires_at: float | None = None,
    response_received_at: float | None = None, provided: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The session resource: as created (``authentication_requested``) or after the proof."""
    attrs: dict[str, Any] = {"agent_id": agent_id}
    if evaluation is None:
        attrs["authentication_requested"] = [_pop_method(challenge_b64)]
    else:
        attrs["evaluation"] = evaluation
        method = _pop_method(challenge_b64)
        if provided is not None:
            method["data"] = dict(provided)
        attrs["authentication"] = [method]
    attrs["created_at"] = timestamp(created_at)
    attrs["challenges_expire_at"] = timestamp(expires_at)
    if response_received_at is not None:
        attrs["response_received_at"] = timestamp(response_received_at)
    if token is not None:
        attrs["token"] = token
        attrs["token_expires_at"] = timestamp(token_expires_at)
    return {"data": {"type": "session", "id": session_id, "attributes": attrs}}


# --- capabilities ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteCapabilities:
    hash_algorithms: list[str]
    signature_schemes: list[str]
    #: bank -> PCRs the agent can quote
    available: dict[str, list[int]]
    certification_keys: list[dict[str, Any]]


@dataclass(frozen=True)
class LogCapabilities:
    evidence_type: str
    entry_count: int
    supports_partial_access: bool
    formats: list[str]


@dataclass(frozen=True)
class Capabilities:
    quote: QuoteCapabilities
    logs: dict[str, LogCapabilities]
    system_info: dict[str, Any]
    #: the evidence_supported list as sent (stored with the attestation)
    supported: list[Any] = field(default_factory=list)

    @property
    def boot_time(self) -> str | None:
        value = self.system_info.get("boot_time")
        return value if isinstance(value, str) else None


def _pcr_list(value: object, where: str) -> list[int]:
    items = _list(value, where, status=422)
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= MAX_PCR for p in items):
        raise WireError(422, f"{where} must list PCR numbers 0-{MAX_PCR}")
    return sorted(set(items))


def _available(value: object, hash_algorithms: list[str]) -> dict[str, list[int]]:
    where = "capabilities.available_subjects"
    if isinstance(value, list):  # the documented flat list: the same PCRs in every offered bank
        pcrs = _pcr_list(value, where)
        return {bank: pcrs for bank in hash_algorithms}
    if not isinstance(value, dict) or len(value) > 16:
        raise WireError(422, f"{where} must map PCR bank names to PCR numbers")
    return {str(bank).lower(): _pcr_list(pcrs, f"{where}.{bank}") for bank, pcrs in value.items()}


def _quote_caps(caps: dict[str, Any]) -> QuoteCapabilities:
    hashes = _names(caps.get("hash_algorithms"), "capabilities.hash_algorithms")
    schemes = _names(caps.get("signature_schemes"), "capabilities.signature_schemes")
    available = _available(caps.get("available_subjects"), hashes)
    keys = _list(caps.get("certification_keys", []), "capabilities.certification_keys", status=422)
    if not all(isinstance(k, dict) for k in keys):
        raise WireError(422, "capabilities.certification_keys must list objects")
    return QuoteCapabilities(hashes, schemes, available, keys)


def _log_caps(kind: str, caps: dict[str, Any]) -> LogCapabilities:
    count = _int(caps.get("entry_count", 0), f"{kind}.capabilities.entry_count", status=422)
    partial = caps.get("supports_partial_access", False)
    if not isinstance(partial, bool):
        raise WireError(422, f"{kind}.capabilities.supports_partial_access must be a boolean")
    formats = caps.get("formats", [])
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise WireError(422, f"{kind}.capabilities.formats must list media types")
    return LogCapabilities(kind, count, partial, formats)


def parse_capabilities(doc: object) -> Capabilities:
    """``POST /agents/{id}/attestations``: exactly one certification/tpm_quote, optional logs."""
    attrs = _attributes(doc, "attestation")
    supported = _list(attrs.get("evidence_supported"), "data.attributes.evidence_supported", min_len=1)
    quote: QuoteCapabilities | None = None
    logs: dict[str, LogCapabilities] = {}
    for i, item in enumerate(supported):
        where = f"evidence_supported[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("capabilities"), dict):
            raise WireError(400, f"{where} must be an object with a 'capabilities' object")
        cls, kind = item.get("evidence_class"), item.get("evidence_type")
        if (cls, kind) == (CERTIFICATION, TPM_QUOTE):
            if quote is not None:
                raise WireError(422, "evidence_supported lists tpm_quote twice")
            quote = _quote_caps(item["capabilities"])
        elif cls == LOG and kind in (IMA_LOG, UEFI_LOG):
            if kind in logs:
                raise WireError(422, f"evidence_supported lists {kind} twice")
            logs[kind] = _log_caps(kind, item["capabilities"])
        elif not isinstance(cls, str) or not isinstance(kind, str):
            raise WireError(400, f"{where} needs evidence_class and evidence_type strings")
        # other evidence types: not requested, ignored (forward compatible)
    if quote is None:
        raise WireError(422, "evidence_supported must offer certification/tpm_quote")
    info = attrs.get("system_info", {})
    if not isinstance(info, dict):
        raise WireError(400, "data.attributes.system_info must be an object")
    boot = info.get("boot_time")
    if boot is not None and (not isinstance(boot, str) or len(boot) > 64):
        raise WireError(400, "system_info.boot_time must be an ISO 8601 string")
    return Capabilities(quote, logs, info, supported)


# --- what the verifier asks for --------------------------------------------------------------------


@dataclass(frozen=True)
class Requested:
    challenge_b64: str
    hash_alg: str
    signature_scheme: str
    pcrs: list[int]
    #: log type -> starting offset (only the logs requested)
    logs: dict[str, int]
    key: dict[str, Any]


def evidence_requested(req: Requested) -> list[dict[str, Any]]:
    """The ``evidence_requested`` list: the quote first, then each requested log."""
    items: list[dict[str, Any]] = [{
        "evidence_class": CERTIFICATION,
        "evidence_type": TPM_QUOTE,
        "chosen_parameters": {
            "challenge": req.challenge_b64,
            "signature_scheme": req.signature_scheme,
            "hash_algorithm": req.hash_alg,
            "selected_subjects": {req.hash_alg: list(req.pcrs)},
            "certification_key": dict(req.key),
        },
    }]
    for kind, offset in req.logs.items():
        fmt = "text/plain" if kind == IMA_LOG else "application/octet-stream"
        items.append({"evidence_class": LOG, "evidence_type": kind,
                      "chosen_parameters": {"starting_offset": offset, "format": fmt}})
    return items


# --- evidence --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    message: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcr_blob: bytes  # tpm2-tools blob (built from the documented object form when sent so)
    #: log type -> (entries as sent: IMA text, or the decoded UEFI bytes; entry count)
    logs: dict[str, tuple[str | bytes, int]]
    #: the blob as :func:`parse_evidence` decoded it, ``pcr_blob.decode_single(pcr_blob)``, when
    #: it was sent as base64 and selects one bank (else None): :func:`parsed_quote` uses it instead
    #: of decoding the blob again. Not part of equality (it follows from ``pcr_blob``).
    blob_pcrs: tuple[str, dict[int, bytes]] | None = field(default=None, compare=False, repr=False)


def _subject_blob(value: object, hash_alg: str) -> tuple[bytes, tuple[str, dict[int, bytes]] | None]:
    """The PCR blob and, when it selects one bank, its decode (kept for :func:`parsed_quote`)."""
    if isinstance(value, str):
        blob = _b64(value, "tpm_quote.data.subject_data")
        try:
            return blob, pcr_blob.decode_single(blob)
        except ProtocolError:
            pass  # not one bank, or malformed: the validation as always, by the full decode
        try:
            pcr_blob.decode(blob)
        except ProtocolError as exc:
            raise WireError(422, f"tpm_quote.data.subject_data: {exc}") from None
        return blob, None
    if isinstance(value, dict):  # the documented {"<pcr>": "<hex value>"} of the chosen bank
        pcrs: dict[int, bytes] = {}
        try:
            for key, hexval in value.items():
                pcr = validation.pcr_number(key)
                if not isinstance(hexval, str):
                    raise WireError(422, f"tpm_quote.data.subject_data.{key} must be a hex string")
                pcrs[pcr] = bytes.fromhex(hexval.lower().removeprefix("0x"))
            return pcr_blob.encode({hash_alg: pcrs}), None
        except (ValueError, ProtocolError) as exc:
            if isinstance(exc, WireError):
                raise
            raise WireError(422, f"tpm_quote.data.subject_data: {exc}") from None
    raise WireError(400, "tpm_quote.data.subject_data must be base64 of the PCR blob or a PCR object")


def _line_count(text: str) -> int:
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def parse_evidence(doc: object, requested: list[dict[str, Any]], hash_alg: str) -> Evidence:
    """``PATCH .../attestations/{latest|n}``: the items requested, in order and number."""
    attrs = _attributes(doc, "attestation")
    collected = _list(attrs.get("evidence_collected"), "data.attributes.evidence_collected", min_len=1)
    if len(collected) != len(requested):
        raise WireError(422, f"evidence_collected has {len(collected)} items, {len(requested)} were requested")
    message = signature = blob = b""
    blob_pcrs: tuple[str, dict[int, bytes]] | None = None
    logs: dict[str, tuple[str | bytes, int]] = {}
    for i, (item, want) in enumerate(zip(collected, requested, strict=True)):
        where = f"evidence_collected[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("data"), dict):
            raise WireError(400, f"{where} must be an object with a 'data' object")
        kind = want["evidence_type"]
        if item.get("evidence_class") != want["evidence_class"] or item.get("evidence_type") != kind:
            raise WireError(422, f"{where} must be {want['evidence_class']}/{kind} (the requested order)")
        data = item["data"]
        if kind == TPM_QUOTE:
            message = _b64(data.get("message"), "tpm_quote.data.message")
            signature = _b64(data.get("signature"), "tpm_quote.data.signature")
            blob, blob_pcrs = _subject_blob(data.get("subject_data"), hash_alg)
        elif kind == IMA_LOG:
            entries = data.get("entries", "")
            if not isinstance(entries, str):
                raise WireError(400, "ima_log.data.entries must be the measurement list lines (text)")
            count = _line_count(entries)
            if "entry_count" in data and _int(data["entry_count"], "ima_log.data.entry_count") != count:
                raise WireError(422, f"ima_log.data.entry_count is not the {count} lines sent")
            logs[kind] = (entries, count)
        else:  # uefi_log: base64 of the binary event log
            raw = data.get("entries", "")
            log = _b64(raw, "uefi_log.data.entries", limit=1 << 26) if raw else b""
            logs[kind] = (log, len(log))
    return Evidence(message, signature, blob, logs, blob_pcrs)


# --- the attestation resource ----------------------------------------------------------------------


def attestation_document(res: Mapping[str, Any], prefix: str, *, meta: dict[str, Any] | None = None,
                         with_evidence: bool = True) -> dict[str, Any]:
    """One attestation resource. ``res``: agent_id, index, stage, evaluation, failure_reason,
    evidence (list), evidence_requested (list or None), system_info, and epoch times
    capabilities_received_at, challenges_expire_at, evidence_received_at, verification_completed_at."""
    attrs: dict[str, Any] = {"stage": res["stage"], "evaluation": res["evaluation"],
                             "failure_reason": res.get("failure_reason")}
    if res["stage"] == "awaiting_evidence" and res.get("evidence_requested") is not None:
        attrs["evidence_requested"] = res["evidence_requested"]
    if with_evidence:
        attrs["evidence"] = res.get("evidence") or []
    attrs["system_info"] = res.get("system_info") or {}
    for name in ("capabilities_received_at", "challenges_expire_at", "evidence_received_at",
                 "verification_completed_at"):
        attrs[name] = timestamp(res.get(name))
    out: dict[str, Any] = {"data": {
        "type": "attestation",
        "id": str(res["index"]),
        "attributes": attrs,
        "links": {"self": f"{prefix}/agents/{res['agent_id']}/attestations/{res['index']}"},
    }}
    if meta is not None:
        out["meta"] = meta
    out["jsonapi"] = dict(JSONAPI)
    return out


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


def parsed_quote(ev: Evidence) -> tpm_quote.ParsedQuote | None:
    """The quote of ``ev`` decoded from its bytes, equal to ``parse_quote(quote_text(ev))``
    without the base64 round trip (the evidence arrived as base64, was decoded once by
    :func:`parse_evidence`, and the check would encode and decode it again). None when that
    parse would fail (too long, or a part that does not decode): the caller then passes
    :func:`quote_text` so that the failure is reported exactly as the text path reports it."""
    length = 3 + _b64_len(len(ev.message)) + _b64_len(len(ev.signature)) + _b64_len(len(ev.pcr_blob))
    if length > tpm_quote.MAX_QUOTE_TEXT:
        return None
    try:
        info = tpm_quote.decode_attest(ev.message)
        sig = tpm_quote.decode_signature(ev.signature)
        bank, pcrs = ev.blob_pcrs if ev.blob_pcrs is not None else tpm_quote.decode_pcr_blob(ev.pcr_blob)
    except ProtocolError:
        return None
    return tpm_quote.ParsedQuote(bytes(ev.message), bytes(ev.signature), bytes(ev.pcr_blob), info, sig, bank, dict(pcrs))


def quote_text(ev: Evidence) -> str:
    """The evidence as a Keylime quote string (``r<attest>:<sig>:<blob>``), for the shared checks."""
    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return "r" + b64(ev.message) + ":" + b64(ev.signature) + ":" + b64(ev.pcr_blob)


def choose_hash(ak_hash: str, offered: list[str], accepted: list[str],
                available: Mapping[str, list[int]]) -> str | None:
    """The quote's hash: the AK's scheme hash (a TPM signs a quote with it, and the bank quoted
    must be that hash), when the agent offers it, the enrolment accepts it and it has a bank."""
    if ak_hash in offered and ak_hash in accepted and ak_hash in available and ak_hash in tpm2.HASH_ALGS:
        return ak_hash
    return None
