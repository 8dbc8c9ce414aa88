"""EK certificates: parse what agents send, match them to the EK, check them against vendor CAs.

Trust model (as upstream's ``tpm_cert_store``): every certificate in the store directory is a
trust anchor (TPM vendors ship roots and intermediates side by side), so an EK cert is accepted
when one store certificate is its direct issuer (issuer name matches and the signature verifies).
Validity dates are not checked: many real EK certs carry dates that are wrong or long expired,
and an EK cert attests a manufacturing fact, not a current authorisation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.types import TPM2B_PUBLIC

from protocol import tpm2, validation
from protocol.errors import ValidationError

log = logging.getLogger("keytrio.registrar")

_STORE_SUFFIXES = {".pem", ".crt", ".cer", ".der"}


def _trim_der(raw: bytes) -> bytes:
    """The leading DER SEQUENCE of ``raw``: EK certs read from NV often carry trailing padding."""
    if len(raw) < 2 or raw[0] != 0x30:
        return raw
    first = raw[1]
    if first < 0x80:
        end = 2 + first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(raw) < 2 + n:
            return raw
        end = 2 + n + int.from_bytes(raw[2 : 2 + n], "big")
    return raw[:end] if end <= len(raw) else raw


def parse_ekcert(value: object, field: str = "ekcert") -> x509.Certificate | None:
    """``None`` for null/absent; else the certificate from base64 DER or PEM text."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, "must be base64 DER, PEM or null")
    try:
        if "-----BEGIN" in value:
            validation.pem(value, field, label="CERTIFICATE")
            return x509.load_pem_x509_certificate(value.encode("ascii"))
        raw = validation.b64(value.strip(), field)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(_trim_der(raw))
    except (ValueError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError(field, "is not a valid X.509 certificate") from None


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def check_matches_ek(cert: x509.Certificate, ek: TPM2B_PUBLIC) -> None:
    """Raise ValidationError unless the certificate's public key is the EK's."""
    try:
        cert_key = _spki(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        raise ValidationError("ekcert", "public key of the certificate cannot be read") from None
    if cert_key != _spki(tpm2.public_key(ek)):
        raise ValidationError("ekcert", "public key does not match ek_tpm")


def load_cert_store(directory: Path) -> list[x509.Certificate]:
    """Every certificate (PEM, possibly several per file, or DER) in ``directory``."""
    certs: list[x509.Certificate] = []
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file() or path.suffix.lower() not in _STORE_SUFFIXES:
            continue
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                certs.extend(x509.load_pem_x509_certificates(data))
            else:
                certs.append(x509.load_der_x509_certificate(_trim_der(data)))
        except ValueError:
            log.warning("event=tpm_cert_store.unreadable file=%s", path)
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return True  # old v1 roots have no extensions; they are in the store on purpose
    return bc.ca


def chains_to_store(cert: x509.Certificate, store: list[x509.Certificate]) -> bool:
    """True when a CA certificate of the store directly issued ``cert``."""
    for ca in store:
        if ca.subject != cert.issuer or not _is_ca(ca):
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return True
    return False
