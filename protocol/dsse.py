"""DSSE envelopes, as ``keylime-policy sign runtime`` produces them for signed runtime policies.

Facts (upstream Keylime 7.14.3, keylime/dsse; checked against envelopes it generated):

- Envelope JSON: ``{"payload": b64(payload), "payloadType": "application/vnd.keylime+json",
  "signatures": [{"keyid": ..., "sig": b64(signature)}]}`` (standard base64 with padding).
- Signed bytes: PAE = ``"DSSEv1" SP len(type) SP type SP len(body) SP body`` (lengths in ASCII
  decimal, ``type`` UTF-8, ``body`` the raw payload).
- Signature: ECDSA with SHA-256 over the PAE, DER-encoded (both backends; SHA-256 even for P-384).
- keyid: ``ecdsa`` backend = hex SHA-256 of the public key's SubjectPublicKeyInfo PEM;
  ``x509`` backend = base64 of the signing certificate's PEM. Verification never trusts keyid:
  the verifier's configured key (or certificate) is what counts.

Pure: no files, no clocks (an x509 certificate's validity period is *not* checked: upstream's
certificates live for 30 days and the verifier has the certificate pinned anyway).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keytrio.protocol import safejson
from keytrio.protocol.errors import ProtocolError

KEYLIME_PAYLOAD_TYPE = "application/vnd.keylime+json"


class DsseError(ProtocolError):
    """A DSSE envelope is malformed, unsigned, or no signature verifies with the given key."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes a signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def _b64d(value: object, what: str, *, allow_empty: bool = False) -> bytes:
    if not isinstance(value, str) or not (value or allow_empty):
        raise DsseError(f"{what}: must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        pass
    try:  # URL-safe alphabet: the DSSE spec allows either
        return base64.b64decode(value, altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise DsseError(f"{what}: not base64") from exc


def load_verification_key(key: bytes | str) -> ec.EllipticCurvePublicKey:
    """An ECDSA public key from PEM/DER SubjectPublicKeyInfo or an x509 certificate (PEM/DER)."""
    data = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
    loaders = (
        lambda d: x509.load_pem_x509_certificate(d).public_key(),
        lambda d: x509.load_der_x509_certificate(d).public_key(),
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
    )
    for load in loaders:
        try:
            pub = load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise DsseError(f"unsupported key type {type(pub).__name__}: DSSE policies use ECDSA")
        return pub
    raise DsseError("key: not a PEM/DER public key or x509 certificate")


def parse_envelope(envelope_json: str | bytes) -> tuple[str, bytes, list[dict[str, Any]]]:
    """(payloadType, payload, signatures) of a structurally valid envelope (signatures unchecked)."""
    try:
        env = safejson.loads(envelope_json)
    except safejson.JsonError as exc:
        raise DsseError(f"envelope: not JSON ({exc})") from exc
    if not isinstance(env, dict):
        raise DsseError("envelope: must be a JSON object")
    ptype = env.get("payloadType")
    if not isinstance(ptype, str) or not ptype:
        raise DsseError("payloadType: must be a non-empty string")
    payload = _b64d(env.get("payload"), "payload", allow_empty=True)
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise DsseError("signatures: must be a non-empty list")
    for i, s in enumerate(sigs):
        if not isinstance(s, dict) or not isinstance(s.get("sig"), str):
            raise DsseError(f"signatures[{i}]: must be an object with a 'sig' string")
        if "keyid" in s and not isinstance(s["keyid"], str):
            raise DsseError(f"signatures[{i}].keyid: must be a string")
    return ptype, payload, sigs


def is_envelope(doc: object) -> bool:
    """True for a decoded JSON object shaped like a DSSE envelope (upstream keys off 'payload')."""
    return isinstance(doc, dict) and "payload" in doc and "signatures" in doc


def _hashes_for(pub: ec.EllipticCurvePublicKey) -> tuple[hashes.HashAlgorithm, ...]:
    # Upstream always uses SHA-256; accept the curve-matched hash too for P-384/P-521 signers.
    if isinstance(pub.curve, ec.SECP384R1):
        return (hashes.SHA256(), hashes.SHA384())
    if isinstance(pub.curve, ec.SECP521R1):
        return (hashes.SHA256(), hashes.SHA512())
    return (hashes.SHA256(),)


def verify_envelope(
    envelope_json: str | bytes, key: bytes | str, *, payload_type: str | None = None
) -> bytes:
    """The payload of an envelope that carries a valid signature by ``key``; else DsseError.

    ``key`` is a PEM/DER ECDSA public key or an x509 certificate (the ``x509`` backend).
    ``payload_type``, when given, must equal the envelope's.
    """
    pub = load_verification_key(key)
    ptype, payload, sigs = parse_envelope(envelope_json)
    if payload_type is not None and ptype != payload_type:
        raise DsseError(f"payloadType: expected {payload_type!r}, got {ptype!r}")
    message = pae(ptype, payload)
    for i, s in enumerate(sigs):
        sig = _b64d(s["sig"], f"signatures[{i}].sig")
        for h in _hashes_for(pub):
            try:
                pub.verify(sig, message, ec.ECDSA(h))
            except InvalidSignature:
                continue
            return payload
    raise DsseError("no signature verifies with the given key")


def ecdsa_keyid(public_key: ec.EllipticCurvePublicKey) -> str:
    """Upstream ``ecdsa`` backend keyid: hex SHA-256 of the SubjectPublicKeyInfo PEM."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def x509_keyid(certificate: x509.Certificate) -> str:
    """Upstream ``x509`` backend keyid: base64 of the certificate PEM."""
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.PEM)).decode()


def sign_envelope(
    payload: bytes,
    payload_type: str,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    certificate: x509.Certificate | None = None,
) -> str:
    """An envelope with one ECDSA/SHA-256 signature (deterministic, RFC 6979: no randomness).

    With ``certificate`` the keyid is the x509 backend's, else the ecdsa backend's.
    """
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise DsseError("private_key: must be an ECDSA private key")
    if certificate is not None and certificate.public_key() != private_key.public_key():
        raise DsseError("certificate: does not match the private key")
    sig = private_key.sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    keyid = x509_keyid(certificate) if certificate else ecdsa_keyid(private_key.public_key())
    return json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": payload_type,
            "signatures": [{"keyid": keyid, "sig": base64.b64encode(sig).decode()}],
        }
    )
