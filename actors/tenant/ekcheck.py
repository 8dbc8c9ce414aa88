"""EK certificate check (upstream's ``require_ek_cert``): the registrar's ``ekcert`` must chain to
the tenant's EK trust store (protocol.ekcert.chain_to_store: through the store's intermediates to
its root), and its public key must be the registered ``ek_tpm``.

A trust store is certificate files (PEM, several per file allowed, or DER) and directories of them.
A directory is read for certificates only: other files (the CA's private keys, serial counters,
configuration, as in an swtpm-localca directory) are skipped and named once in a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from cryptography import x509

from keytrio.actors.tenant.errors import UsageError, VerificationFailed
from keytrio.protocol import ekcert, tpm2
from keytrio.protocol.errors import DecodeError, ProtocolError

StrPath = str | os.PathLike[str]
_WHAT = "EK certificate"
log = logging.getLogger("keytrio.tenant")


def _read_certs(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as fh:
        data = fh.read()
    if b"-----BEGIN" in data and b"-----BEGIN CERTIFICATE" not in data:
        raise DecodeError("a PEM file without a certificate (a key?)")
    return ekcert.load_many(data)


def load_trust_store(
    items: Iterable[StrPath | x509.Certificate], *, warn: Callable[[str], None] | None = None
) -> list[x509.Certificate]:
    """The certificates of ``items``: files, directories (one level) or certificates already loaded.

    A file named explicitly must hold certificates (UsageError otherwise); in a directory, files
    without one are skipped and named in one ``warn`` call per directory (default: a log warning)."""
    say = warn or log.warning
    certs: list[x509.Certificate] = []
    for item in items:
        if isinstance(item, x509.Certificate):
            certs.append(item)
            continue
        path = os.fspath(item)
        if not os.path.isdir(path):
            try:
                certs.extend(_read_certs(path))
            except (OSError, DecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise UsageError(f"EK trust store file {path}: {reason}") from exc
            continue
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise UsageError(f"EK trust store directory {path}: {exc.strerror or exc}") from exc
        skipped = []
        for name in names:
            f = os.path.join(path, name)
            if not os.path.isfile(f):
                continue
            try:
                certs.extend(_read_certs(f))
            except (OSError, DecodeError):
                skipped.append(name)
        if skipped:
            say(f"EK trust store {path}: skipped {len(skipped)} file(s) holding no certificate: {', '.join(skipped)}")
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


def check_ek(ekcert_value: object, ek_tpm_b64: object, store: list[x509.Certificate]) -> list[x509.Certificate]:
    """Raise VerificationFailed unless ``ekcert`` chains to ``store`` and certifies ``ek_tpm``;
    returns the verified path (EK certificate first)."""
    cert = parse_ekcert(ekcert_value)
    try:
        path = ekcert.chain_to_store(cert, store)
    except ekcert.ChainError as exc:
        raise VerificationFailed(_WHAT, str(exc)) from exc
    if not isinstance(ek_tpm_b64, str):
        raise VerificationFailed(_WHAT, "the registrar record has no ek_tpm")
    try:
        same = ekcert.certifies(cert, tpm2.public_from_b64(ek_tpm_b64))
    except ProtocolError as exc:
        raise VerificationFailed(_WHAT, f"cannot compare keys ({exc})") from exc
    if not same:
        raise VerificationFailed(_WHAT, "its public key is not the registered EK (ek_tpm)")
    return path
