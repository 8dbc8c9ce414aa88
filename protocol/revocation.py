"""Revocation notices: the verifier's signed message to agents (POST notifications/revocation).

Wire form: ``{"msg": "<JSON text>", "signature": "<b64>"}``. The message keys and their order
follow upstream Keylime's verifier (``type, ip, agent_id, port, tpm_policy, meta_data,
event_time`` and, when a failure event caused it, ``event_id, severity_label, context``), where
``context`` is itself JSON *text* (upstream's failure event stores ``json.dumps(context)``).
keytrio appends ``notice_id`` so a receiver can drop duplicates of a re-sent notice; upstream
agents ignore unknown keys. The signature is RSA-PSS (MGF1-SHA256, maximal salt), SHA-256 over
the exact UTF-8 bytes of ``msg``; upstream sends an empty signature when no key was enrolled.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keytrio.protocol import safejson
from keytrio.protocol.errors import ProtocolError, ValidationError

MSG_TYPE = "revocation"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_MAX_SIG_B64 = 4096  # an RSA-16384 signature in base64 is < 2,800 chars; bound hostile input


class RevocationError(ProtocolError):
    """A notice is malformed, unsigned, or its signature does not verify."""


@dataclass(frozen=True)
class Notice:
    """A revocation notice as it travels (:func:`parse_notice` decodes one)."""

    msg: str
    signature: str

    def encode(self) -> dict[str, str]:
        return {"msg": self.msg, "signature": self.signature}


def build_message(
    *,
    agent_id: str,
    ip: Any,
    port: Any,
    tpm_policy: Any,
    meta_data: Any,
    event_time: str,
    event_id: str | None = None,
    severity_label: str | None = None,
    context: dict[str, Any] | str | None = None,
    notice_id: str | None = None,
) -> str:
    """The ``msg`` JSON text, key order and encoding as upstream's verifier produces it.

    ``tpm_policy`` and ``meta_data`` are passed through unchanged (upstream sends the JSON text it
    stored). ``event_time`` is ``time.asctime()``-style text from the caller's clock. The event
    fields are included only when ``event_id`` is given; a ``str`` context is a message and becomes
    ``{"message": context}`` as upstream does; the context is then embedded as JSON text.
    """
    msg: dict[str, Any] = {
        "type": MSG_TYPE,
        "ip": ip,
        "agent_id": agent_id,
        "port": port,
        "tpm_policy": tpm_policy,
        "meta_data": meta_data,
        "event_time": event_time,
    }
    if event_id is not None:
        ctx: dict[str, Any] = {"message": context} if isinstance(context, str) else dict(context or {})
        msg["event_id"] = event_id
        msg["severity_label"] = severity_label
        msg["context"] = json.dumps(ctx)
    if notice_id is not None:
        msg["notice_id"] = notice_id
    # json.dumps defaults (", " / ": " separators, ASCII escapes) match upstream's text exactly.
    return json.dumps(msg)


def sign_message(private_key: rsa.RSAPrivateKey, msg: str) -> str:
    """b64 RSA-PSS(SHA-256, MGF1-SHA256, salt MAX) over the UTF-8 bytes of ``msg``."""
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise RevocationError("revocation key must be an RSA private key")
    sig = private_key.sign(msg.encode("utf-8"), _PSS, hashes.SHA256())
    return base64.b64encode(sig).decode("ascii")


def parse_notice(body: object) -> Notice:
    """Validate a POST notifications/revocation body ``{"msg": str, "signature": str}``."""
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object")
    msg, sig = body.get("msg"), body.get("signature")
    if not isinstance(msg, str):
        raise ValidationError("msg", "must be a string")
    if not isinstance(sig, str):
        raise ValidationError("signature", "must be a string")
    return Notice(msg, sig)


def _public_key(key: object) -> rsa.RSAPublicKey:
    if isinstance(key, str):
        key = key.encode("ascii", "replace")
    if isinstance(key, bytes):
        try:
            if b"CERTIFICATE" in key:
                key = x509.load_pem_x509_certificate(key)
            else:
                key = serialization.load_pem_public_key(key)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise RevocationError("revocation certificate/key is not valid PEM") from exc
    if isinstance(key, x509.Certificate):
        key = key.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise RevocationError("revocation key must be RSA")
    return key


def verify_notice(cert_or_public_key: object, msg: str, signature_b64: str) -> dict[str, Any]:
    """Check the signature over ``msg`` and return the parsed message.

    ``cert_or_public_key``: an x509 Certificate, an RSA public key, or PEM text/bytes of either.
    Raises RevocationError on a missing/bad signature or a message that is not a revocation object.
    """
    key = _public_key(cert_or_public_key)
    if not isinstance(msg, str):
        raise RevocationError("msg must be a string")
    if not isinstance(signature_b64, str) or signature_b64 in ("", "none"):
        raise RevocationError("notice is not signed")
    if len(signature_b64) > _MAX_SIG_B64:
        raise RevocationError("signature too long")
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RevocationError("signature is not base64") from exc
    try:
        data = msg.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RevocationError("msg is not encodable as UTF-8") from exc
    try:
        key.verify(sig, data, _PSS, hashes.SHA256())
    except InvalidSignature as exc:
        raise RevocationError("signature does not verify") from exc
    try:
        parsed = safejson.loads(msg)
    except safejson.JsonError as exc:
        raise RevocationError("msg is not JSON") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != MSG_TYPE:
        raise RevocationError("msg is not a revocation message")
    return parsed
