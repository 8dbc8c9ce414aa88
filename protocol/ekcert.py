"""EK certificates: decode what registrars store and agents send, match them to the EK, and check
direct issuance by a trust store (upstream's ``tpm_cert_store`` / ``require_ek_cert`` model).

Every certificate of a store is a trust anchor (TPM vendors ship roots and intermediates side by
side), so an EK cert is accepted when one store CA is its direct issuer (issuer name matches and
the signature verifies). Validity dates are not checked: many real EK certs carry dates that are
wrong or long expired, and an EK cert attests a manufacturing fact, not a current authorisation.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.types import TPM2B_PUBLIC

from keytrio.protocol import tpm2
from keytrio.protocol.errors import DecodeError, ProtocolError


def trim_der(raw: bytes) -> bytes:
    """The leading DER SEQUENCE of ``raw``: EK certs read from TPM NV often carry trailing padding."""
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


def parse(value: str) -> x509.Certificate:
    """A certificate from PEM text, base64 DER, or base64 of PEM; DecodeError otherwise."""
    try:
        if "-----BEGIN" in value:
            return x509.load_pem_x509_certificate(value.encode("ascii"))
        raw = base64.b64decode(value.strip(), validate=True)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(trim_der(raw))
    except (ValueError, binascii.Error, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise DecodeError(f"not a readable X.509 certificate ({exc})") from None


def load_many(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a file's bytes: PEM (several allowed) or one DER; DecodeError otherwise."""
    try:
        if b"-----BEGIN CERTIFICATE" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(trim_der(data))]
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DecodeError(f"not a readable certificate file ({exc})") from None


def _spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def certifies(cert: x509.Certificate, ek: TPM2B_PUBLIC | bytes) -> bool:
    """True when the certificate's public key is the EK's; DecodeError when a key cannot be read."""
    try:
        return _spki(cert.public_key()) == _spki(tpm2.public_key(ek))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DecodeError(f"cannot compare the certificate and EK keys ({exc})") from None
    except ProtocolError:
        raise


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return True  # old v1 roots have no extensions; they are in the store on purpose


def issued_by_any(cert: x509.Certificate, store: Iterable[x509.Certificate]) -> bool:
    """True when a CA certificate of ``store`` directly issued ``cert``."""
    for ca in store:
        if ca.subject != cert.issuer or not _is_ca(ca):
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return True
    return False
