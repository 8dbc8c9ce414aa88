"""EK certificate check (upstream's ``require_ek_cert``): the registrar's ``ekcert`` must be issued
by a CA of the tenant's EK trust store, and its public key must be the registered ``ek_tpm``.

Every certificate in the trust store is a trust anchor (TPM vendors ship roots and intermediates
side by side), so direct issuance by any store CA is enough. Validity dates are not checked: EK
certs attest a manufacturing fact and often carry odd dates.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from actors.tenant.errors import UsageError, VerificationFailed
from protocol import tpm2
from protocol.errors import ProtocolError

StrPath = str | os.PathLike[str]
_WHAT = "EK certificate"


def load_trust_store(paths: Iterable[StrPath]) -> list[x509.Certificate]:
    """Certificates from PEM (several per file allowed) or DER files; directories are walked."""
    certs: list[x509.Certificate] = []
    for p in paths:
        path = os.fspath(p)
        files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
        for f in files:
            if not os.path.isfile(f):
                continue
            try:
                with open(f, "rb") as fh:
                    data = fh.read()
                if b"-----BEGIN CERTIFICATE" in data:
                    certs.extend(x509.load_pem_x509_certificates(data))
                else:
                    certs.append(x509.load_der_x509_certificate(_trim_der(data)))
            except (OSError, ValueError) as exc:
                raise UsageError(f"EK trust store file {f} is unreadable: {exc}") from exc
    if not certs:
        raise UsageError("the EK trust store holds no certificate")
    return certs


def _trim_der(raw: bytes) -> bytes:
    """The leading DER SEQUENCE: EK certs read from TPM NV often carry trailing padding."""
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


def parse_ekcert(value: object) -> x509.Certificate:
    """The registrar's ``ekcert`` (base64 DER, or PEM text); VerificationFailed when absent/bad."""
    if not isinstance(value, str) or not value.strip():
        raise VerificationFailed(_WHAT, "the registrar holds no EK certificate for this agent")
    try:
        if "-----BEGIN" in value:
            return x509.load_pem_x509_certificate(value.encode("ascii"))
        raw = base64.b64decode(value.strip(), validate=True)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(_trim_der(raw))
    except (ValueError, binascii.Error, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise VerificationFailed(_WHAT, f"not a readable certificate ({exc})") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return True  # v1 roots have no extensions; they are in the store on purpose


def issued_by_store(cert: x509.Certificate, store: Iterable[x509.Certificate]) -> bool:
    for ca in store:
        if ca.subject != cert.issuer or not _is_ca(ca):
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return True
    return False


def _spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def check_ek(ekcert: object, ek_tpm_b64: object, store: list[x509.Certificate]) -> x509.Certificate:
    """Raise VerificationFailed unless ``ekcert`` chains to ``store`` and certifies ``ek_tpm``."""
    cert = parse_ekcert(ekcert)
    if not issued_by_store(cert, store):
        raise VerificationFailed(_WHAT, f"not issued by a CA of the EK trust store (issuer {cert.issuer.rfc4514_string()})")
    if not isinstance(ek_tpm_b64, str):
        raise VerificationFailed(_WHAT, "the registrar record has no ek_tpm")
    try:
        ek_key = tpm2.public_key(tpm2.public_from_b64(ek_tpm_b64))
        cert_key = cert.public_key()
    except (ProtocolError, ValueError, UnsupportedAlgorithm) as exc:
        raise VerificationFailed(_WHAT, f"cannot compare keys ({exc})") from exc
    if _spki(cert_key) != _spki(ek_key):
        raise VerificationFailed(_WHAT, "its public key is not the registered EK (ek_tpm)")
    return cert
