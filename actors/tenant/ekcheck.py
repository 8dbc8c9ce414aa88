"""EK certificate check (upstream's ``require_ek_cert``): the registrar's ``ekcert`` must be issued
by a CA of the tenant's EK trust store, and its public key must be the registered ``ek_tpm``.

Every certificate in the trust store is a trust anchor (TPM vendors ship roots and intermediates
side by side), so direct issuance by any store CA is enough. Validity dates are not checked: EK
certs attest a manufacturing fact and often carry odd dates.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cryptography import x509

from keytrio.actors.tenant.errors import UsageError, VerificationFailed
from keytrio.protocol import ekcert, tpm2
from keytrio.protocol.errors import DecodeError, ProtocolError

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
                    certs.extend(ekcert.load_many(fh.read()))
            except (OSError, DecodeError) as exc:
                raise UsageError(f"EK trust store file {f} is unreadable: {exc}") from exc
    if not certs:
        raise UsageError("the EK trust store holds no certificate")
    return certs


def parse_ekcert(value: object) -> x509.Certificate:
    """The registrar's ``ekcert`` (base64 DER, or PEM text); VerificationFailed when absent/bad."""
    if not isinstance(value, str) or not value.strip():
        raise VerificationFailed(_WHAT, "the registrar holds no EK certificate for this agent")
    try:
        return ekcert.parse(value)
    except DecodeError as exc:
        raise VerificationFailed(_WHAT, str(exc)) from exc


issued_by_store = ekcert.issued_by_any


def check_ek(ekcert_value: object, ek_tpm_b64: object, store: list[x509.Certificate]) -> x509.Certificate:
    """Raise VerificationFailed unless ``ekcert`` chains to ``store`` and certifies ``ek_tpm``."""
    cert = parse_ekcert(ekcert_value)
    if not issued_by_store(cert, store):
        raise VerificationFailed(_WHAT, f"not issued by a CA of the EK trust store (issuer {cert.issuer.rfc4514_string()})")
    if not isinstance(ek_tpm_b64, str):
        raise VerificationFailed(_WHAT, "the registrar record has no ek_tpm")
    try:
        same = ekcert.certifies(cert, tpm2.public_from_b64(ek_tpm_b64))
    except ProtocolError as exc:
        raise VerificationFailed(_WHAT, f"cannot compare keys ({exc})") from exc
    if not same:
        raise VerificationFailed(_WHAT, "its public key is not the registered EK (ek_tpm)")
    return cert
