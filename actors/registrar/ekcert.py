"""The registrar's side of EK certificates (decoding, matching and issuance live in protocol.ekcert):
request-field errors and the ``tpm_cert_store`` directory."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss.types import TPM2B_PUBLIC

from keytrio.protocol import ekcert, validation
from keytrio.protocol.errors import DecodeError, ValidationError

log = logging.getLogger("keytrio.registrar")

_STORE_SUFFIXES = {".pem", ".crt", ".cer", ".der"}
chains_to_store = ekcert.issued_by_any


def parse_ekcert(value: object, field: str = "ekcert") -> x509.Certificate | None:
    """``None`` for null/absent; else the certificate from base64 DER or PEM text."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, "must be base64 DER, PEM or null")
    if "-----BEGIN" in value:
        validation.pem(value, field, label="CERTIFICATE")
    try:
        return ekcert.parse(value)
    except DecodeError:
        raise ValidationError(field, "is not a valid X.509 certificate") from None


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def check_matches_ek(cert: x509.Certificate, ek: TPM2B_PUBLIC) -> None:
    """Raise ValidationError unless the certificate's public key is the EK's."""
    try:
        same = ekcert.certifies(cert, ek)
    except DecodeError:
        raise ValidationError("ekcert", "public key of the certificate cannot be read") from None
    if not same:
        raise ValidationError("ekcert", "public key does not match ek_tpm")


def load_cert_store(directory: Path) -> list[x509.Certificate]:
    """Every certificate (PEM, possibly several per file, or DER) in ``directory``."""
    certs: list[x509.Certificate] = []
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file() or path.suffix.lower() not in _STORE_SUFFIXES:
            continue
        try:
            certs.extend(ekcert.load_many(path.read_bytes()))
        except DecodeError:
            log.warning("event=tpm_cert_store.unreadable file=%s", path)
    return certs
