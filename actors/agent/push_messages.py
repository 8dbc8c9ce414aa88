"""The agent's half of the v3.0 push wire (JSON:API documents), as upstream 7.14.3 speaks it.

Pure: documents in, values out, no I/O. Builders make what the agent sends (session, proof,
capabilities, evidence); parsers read what the verifier answers and raise :class:`WireError` on a
shape they cannot use. Where upstream differs from its docs (shared/PUSH_MODEL_WIRE.md) the agent
sends what upstream accepts (``available_subjects`` as ``{bank: [pcrs]}``, ``subject_data`` as
the tpm2-tools PCR blob) and reads both shapes where the answers differ (attestation index from
``data.id`` or from ``links.self``/``Location``; ``selected_subjects`` as a dict or a list).
"""

from __future__ import annotations

import base64
import binascii
import datetime
from dataclasses import dataclass, field
from typing import Any

AUTH = {"authentication_class": "pop", "authentication_type": "tpm_pop"}
ALL_PCRS = list(range(24))


class WireError(ValueError):
    """The verifier's answer does not have the shape the agent needs."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{what}: expected an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{what}: expected a list")
    return value


def _attributes(doc: Any) -> dict[str, Any]:
    data = _obj(_obj(doc, "document").get("data"), "data")
    return _obj(data.get("attributes"), "data.attributes")


def _challenge(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise WireError(f"{what}: expected base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what}: not base64") from None
    if not 1 <= len(raw) <= 64:  # it becomes a TPM2B_DATA
        raise WireError(f"{what}: {len(raw)} bytes, expected 1-64")
    return raw


def parse_time(value: Any) -> datetime.datetime | None:
    """An ISO 8601 timestamp as upstream writes it (``...Z`` or ``+00:00``); None if absent/unreadable."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.UTC)


# -- PoP session ---------------------------------------------------------------------------------


def session_request(agent_id: str) -> dict[str, Any]:
    return {"data": {"type": "session", "attributes": {"agent_id": agent_id, "authentication_supported": [AUTH]}}}


@dataclass(frozen=True)
class SessionChallenge:
    session_id: str
    challenge: bytes


def parse_session(doc: Any) -> SessionChallenge:
    data = _obj(_obj(doc, "document").get("data"), "data")
    sid = data.get("id")
    if not isinstance(sid, str) or not sid or "/" in sid:
        raise WireError("data.id: expected the session id")
    requested = _list(_attributes(doc).get("authentication_requested"), "authentication_requested")
    for item in requested:
        if isinstance(item, dict) and item.get("authentication_type") == "tpm_pop":
            params = _obj(item.get("chosen_parameters"), "chosen_parameters")
            return SessionChallenge(sid, _challenge(params.get("challenge"), "challenge"))
    raise WireError("authentication_requested: no tpm_pop item")


def proof_request(agent_id: str, session_id: str, message: bytes, signature: bytes) -> dict[str, Any]:
    return {"data": {"type": "session", "id": session_id, "attributes": {
        "agent_id": agent_id,
        "authentication_provided": [{**AUTH, "data": {"message": _b64(message), "signature": _b64(signature)}}],
    }}}


@dataclass(frozen=True)
class ProofResult:
    passed: bool
    token: str | None
    lifetime: float | None  # seconds the token is valid, by the verifier's own clock; None: unknown


def parse_proof(doc: Any) -> ProofResult:
    attrs = _attributes(doc)
    if attrs.get("evaluation") != "pass":
        return ProofResult(False, None, None)
    token = attrs.get("token")
    if not isinstance(token, str) or not token or not token.isprintable() or len(token) > 1024:
        raise WireError("token: expected the bearer token with evaluation pass")
    expires = parse_time(attrs.get("token_expires_at"))
    # both ends of the lifetime from the verifier's clock: the agent's own clock may be off
    start = parse_time(attrs.get("response_received_at")) or parse_time(attrs.get("created_at"))
    lifetime = (expires - start).total_seconds() if expires and start else None
    return ProofResult(True, token, lifetime if lifetime is None or lifetime > 0 else None)


# -- attestation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    ak_public: bytes
    hash_alg: str
    sign_scheme: str
    key_alg: str  # rsa | ecc
    key_size: int
    boot_time: datetime.datetime
    ima_entries: int | None  # complete lines in the IMA log; None: no IMA log on this machine
    uefi_size: int | None  # bytes of the UEFI event log; None: none


def capabilities_request(c: Capabilities) -> dict[str, Any]:
    quote = {"evidence_class": "certification", "evidence_type": "tpm_quote", "capabilities": {
        "component_version": "2.0",
        "hash_algorithms": [c.hash_alg],
        "signature_schemes": [c.sign_scheme],
        "available_subjects": {c.hash_alg: ALL_PCRS},
        "certification_keys": [{
            "key_class": "asymmetric", "key_algorithm": c.key_alg, "key_size": c.key_size,
            "server_identifier": "ak", "local_identifier": "att_local_identifier",
            "allowable_signature_schemes": [c.sign_scheme], "allowable_hash_algorithms": [c.hash_alg],
            "public": _b64(c.ak_public),
        }],
    }}
    supported: list[dict[str, Any]] = [quote]
    # upstream reads an entry_count of 0 as "no log" and then cannot pick an offset: announce the
    # IMA log only once it holds a line (a running IMA always has boot_aggregate)
    if c.ima_entries:
        supported.append({"evidence_class": "log", "evidence_type": "ima_log", "capabilities": {
            "entry_count": c.ima_entries, "supports_partial_access": True, "appendable": True,
            "formats": ["text/plain"],
        }})
    if c.uefi_size:
        supported.append({"evidence_class": "log", "evidence_type": "uefi_log", "capabilities": {
            "evidence_version": "2.1", "entry_count": c.uefi_size, "supports_partial_access": False,
            "appendable": False, "formats": ["application/octet-stream"],
        }})
    boot = c.boot_time.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    return {"data": {"type": "attestation", "attributes": {
        "evidence_supported": supported, "system_info": {"boot_time": boot}}}}


@dataclass(frozen=True)
class QuoteRequest:
    challenge: bytes
    hash_alg: str
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class Requested:
    """What the verifier asked for, in its order (evidence must come back in the same order)."""

    index: str | None  # attestation index, when the answer names one
    items: tuple[str, ...]  # evidence types in order: tpm_quote, ima_log, uefi_log
    quote: QuoteRequest
    ima_offset: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _pcrs(value: Any, hash_alg: str) -> tuple[int, ...]:
    # upstream answers {bank: [pcrs]}; its docs show a flat list: read both
    if isinstance(value, dict):
        value = value.get(hash_alg, [])
    pcrs = _list(value, "selected_subjects")
    if not pcrs or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 23 for p in pcrs):
        raise WireError("selected_subjects: expected PCR numbers 0-23")
    return tuple(sorted(set(pcrs)))


def index_from_link(link: Any) -> str | None:
    """``.../attestations/7`` -> "7" (upstream sends no ``data.id``, only the link)."""
    if not isinstance(link, str):
        return None
    last = link.rstrip("/").rsplit("/", 1)[-1]
    return last if last.isdigit() else None


def parse_requested(doc: Any, location: str | None = None) -> Requested:
    data = _obj(_obj(doc, "document").get("data"), "data")
    index = data.get("id") if isinstance(data.get("id"), str) and str(data.get("id")).isdigit() else None
    links = data.get("links") if isinstance(data.get("links"), dict) else {}
    index = index or index_from_link(links.get("self")) or index_from_link(location)
    items: list[str] = []
    quote: QuoteRequest | None = None
    offset = 0
    for item in _list(_attributes(doc).get("evidence_requested"), "evidence_requested"):
        item = _obj(item, "evidence_requested[]")
        kind = item.get("evidence_type")
        params = item.get("chosen_parameters") if isinstance(item.get("chosen_parameters"), dict) else {}
        if kind == "tpm_quote":
            hash_alg = params.get("hash_algorithm")
            if not isinstance(hash_alg, str):
                raise WireError("tpm_quote: hash_algorithm missing")
            quote = QuoteRequest(_challenge(params.get("challenge"), "tpm_quote challenge"), hash_alg,
                                 _pcrs(params.get("selected_subjects"), hash_alg))
        elif kind == "ima_log":
            raw = params.get("starting_offset", 0)
            if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
                raise WireError("ima_log: starting_offset must be a number >= 0")
            offset = raw
        elif kind != "uefi_log":
            raise WireError(f"evidence_requested: unknown evidence type {kind!r}")
        items.append(kind)
    if quote is None:
        raise WireError("evidence_requested: no tpm_quote")
    return Requested(index, tuple(items), quote, offset)


@dataclass(frozen=True)
class Collected:
    attest: bytes
    signature: bytes
    pcr_blob: bytes
    ima_lines: str = ""  # complete lines from the requested offset
    uefi_log: bytes = b""


def evidence_request(requested: Requested, got: Collected) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for kind in requested.items:
        if kind == "tpm_quote":
            items.append({"evidence_class": "certification", "evidence_type": "tpm_quote", "data": {
                "subject_data": _b64(got.pcr_blob), "message": _b64(got.attest), "signature": _b64(got.signature)}})
        elif kind == "ima_log":
            items.append({"evidence_class": "log", "evidence_type": "ima_log", "data": {
                "entry_count": got.ima_lines.count("\n"), "entries": got.ima_lines}})
        else:
            items.append({"evidence_class": "log", "evidence_type": "uefi_log", "data": {
                "entries": _b64(got.uefi_log)}})
    return {"data": {"type": "attestation", "attributes": {"evidence_collected": items}}}


def seconds_to_next(doc: Any) -> float | None:
    """``meta.seconds_to_next_attestation`` of the evidence answer, if it is a sane number."""
    meta = doc.get("meta") if isinstance(doc, dict) else None
    value = meta.get("seconds_to_next_attestation") if isinstance(meta, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400 * 7:
        return None
    return float(value)
