"""The body of ``POST /v2.x/agents/{uuid}``: field validators and :func:`parse_enrolment`.

Pure validation (a dict in, column values out; an :class:`ApiError` 400 naming the field): no
store, no request. Enrolment takes ``mb_policy`` (inline JSON text) and/or ``mb_policy_name``, and
``runtime_policy_name`` (a stored policy, ``runtime_policy`` empty) or an inline
``runtime_policy``; ``v`` may be null (upstream's tenant without a payload: no V is delivered).
Resolving the named policies against the stores is routes_policies.py's job.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from keytrio.actors.common.app import ApiError, bad_request
from keytrio.protocol import safejson, tpm2, validation
from keytrio.protocol.errors import ProtocolError, ValidationError

#: Fields upstream's tenant always sends and upstream's verifier requires (PROTOCOL.md).
REQUIRED_FIELDS = (
    "v",
    "cloudagent_ip",
    "cloudagent_port",
    "tpm_policy",
    "runtime_policy",
    "runtime_policy_name",
    "runtime_policy_key",
    "mb_policy",
    "mb_policy_name",
    "ima_sign_verification_keys",
    "metadata",
    "revocation_key",
    "accept_tpm_hash_algs",
    "accept_tpm_encryption_algs",
    "accept_tpm_signing_algs",
    "ak_tpm",
    "mtls_cert",
    "supported_version",
)

_VERSION = re.compile(r"^\d{1,3}\.\d{1,3}$")
_ALG_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MAX_TEXT = 256 * 1024  # any single text field; the body limit bounds the total anyway


# --- field validators (raise ValidationError) ------------------------------------------------------


def _text(doc: dict[str, Any], field: str, *, nullable: bool = True, max_len: int | None = _MAX_TEXT) -> str | None:
    value = doc[field]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string" + (" or null" if nullable else ""))
    if max_len is not None and len(value) > max_len:
        raise ValidationError(field, "is too long")
    return value


def _json_text(value: object, field: str) -> Any:
    """A JSON value sent as JSON text (what upstream's tenant does) or directly."""
    if isinstance(value, str):
        try:
            return safejson.loads(value)
        except safejson.JsonError as exc:
            raise ValidationError(field, f"is not valid JSON: {exc.reason}") from None
    return value


def _ip(value: object) -> str:
    return validation.host(value, "cloudagent_ip")


def _v(value: object) -> str | None:
    if value is None or value == "":
        return None  # upstream's tenant sends null without a payload: no V to deliver
    raw = validation.b64(value, "v")
    if len(raw) != 32:
        raise ValidationError("v", "must decode to 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def tpm_policy_text(value: object) -> str:
    """A ``tpm_policy`` (JSON text or object) checked; stored as the text sent, else as JSON."""
    policy = validation.tpm_policy(_json_text(value, "tpm_policy"))
    return value if isinstance(value, str) else json.dumps(policy)


def _alg_list(value: object, field: str) -> list[str]:
    algs = _json_text(value, field)
    if not isinstance(algs, list) or not all(isinstance(a, str) and _ALG_NAME.fullmatch(a) for a in algs):
        raise ValidationError(field, "must be a list of algorithm names (or JSON text of one)")
    return algs


def _meta_data(value: object) -> str:
    meta = _json_text(value, "metadata")
    if not isinstance(meta, dict):
        raise ValidationError("metadata", "must be a JSON object (or JSON text of one)")
    return value if isinstance(value, str) else json.dumps(meta)


def _ak(value: object) -> tuple[str, str, str]:
    """(canonical base64 ak_tpm, enc_alg, sign_alg)."""
    raw = validation.b64(value, "ak_tpm", max_len=4096)
    try:
        pub = tpm2.parse_public(raw)
        tpm2.check_ak_attributes(pub)
        enc, sign, _ = tpm2.key_algorithms(pub)
    except ProtocolError as exc:
        reason = exc.reason if isinstance(exc, ValidationError) else str(exc)
        raise ValidationError("ak_tpm", f"is not a usable AK ({reason})") from None
    return base64.b64encode(tpm2.public_bytes(pub)).decode("ascii"), enc, sign


def _revocation_key(value: object) -> str | None:
    if value is None or value == "":
        return None
    return validation.pem(value, "revocation_key")


def parse_enrolment(agent_id: str, doc: dict[str, Any], *, mode: str = "pull") -> dict[str, Any]:
    """Validate a ``POST /agents/{id}`` body into column values (ApiError 400 naming the problem).

    ``mode`` (the verifier's): ``push`` stores ip/port NULL (a push agent, as upstream does);
    ``both`` does so when both are null; ``pull`` requires them."""
    missing = [f for f in REQUIRED_FIELDS if f not in doc]
    if missing:
        raise ApiError(400, "Bad request: missing required fields: " + ", ".join(missing))
    push = mode == "push" or (mode == "both" and doc["cloudagent_ip"] is None and doc["cloudagent_port"] is None)
    try:
        # an inline policy is as large as the machine's file list: bounded by max_policy_size
        runtime_policy = _text(doc, "runtime_policy", max_len=None) or ""
        validation.b64(runtime_policy, "runtime_policy", allow_empty=True)
        supported = doc["supported_version"]
        if not isinstance(supported, str) or not _VERSION.fullmatch(supported):
            raise ValidationError("supported_version", "must be a version like 2.1")
        ak_tpm, enc_alg, sign_alg = _ak(doc["ak_tpm"])
        keys = _text(doc, "ima_sign_verification_keys")
        if keys:
            _json_text(keys, "ima_sign_verification_keys")
        return {
            "agent_id": agent_id,
            "v": _v(doc["v"]),
            "ip": None if push else _ip(doc["cloudagent_ip"]),
            "port": None if push else validation.port(doc["cloudagent_port"], "cloudagent_port"),
            "tpm_policy": tpm_policy_text(doc["tpm_policy"]),
            "runtime_policy": runtime_policy,
            "runtime_policy_name": _text(doc, "runtime_policy_name"),
            "runtime_policy_key": _text(doc, "runtime_policy_key"),
            "mb_policy": _text(doc, "mb_policy"),
            "mb_policy_name": _text(doc, "mb_policy_name"),
            "ima_sign_verification_keys": keys,
            "meta_data": _meta_data(doc["metadata"]),
            "revocation_key": _revocation_key(doc["revocation_key"]),
            "accept_tpm_hash_algs": json.dumps(_alg_list(doc["accept_tpm_hash_algs"], "accept_tpm_hash_algs")),
            "accept_tpm_encryption_algs": json.dumps(
                _alg_list(doc["accept_tpm_encryption_algs"], "accept_tpm_encryption_algs")
            ),
            "accept_tpm_signing_algs": json.dumps(
                _alg_list(doc["accept_tpm_signing_algs"], "accept_tpm_signing_algs")
            ),
            "ak_tpm": ak_tpm,
            "mtls_cert": validation.mtls_cert(doc["mtls_cert"]),
            "supported_version": supported,
            "enc_alg": enc_alg,
            "sign_alg": sign_alg,
        }
    except ProtocolError as exc:
        raise bad_request(exc) from None

