"""EK certificates: decode what registrars store and agents send, match them to the EK, and check
that one chains to a trust store (upstream's ``tpm_cert_store`` / ``require_ek_cert`` model).

Path building (:func:`chain_to_store`): from the EK certificate to a store certificate that names
its issuer, and on through the store for as long as the store holds a certificate of the current
issuer's name, up to a self-signed root. Each link is checked: the issuer's signature, the issuer
is a CA (basicConstraints cA; keyCertSign when it has a keyUsage; its pathLenConstraint), and the
certificate was issued while its issuer was valid (its notBefore inside the issuer's validity).
A store certificate whose issuer is not in the store ends the path: upstream trusts every
certificate of its store directly, and vendor stores ship intermediates without their roots.
The current time is not checked: many real EK certs carry dates that are wrong or long expired,
and an EK cert attests a manufacturing fact, not a current authorisation.
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


class ChainError(ProtocolError):
    """No verified path from the certificate to the trust store; the message says why."""


#: longest path tried (EK cert, intermediates, root): real TPM vendor chains have 2-4 certificates
MAX_DEPTH = 8


def name_of(name: x509.Name) -> str:
    """A readable distinguished name (EK certs often have an empty subject)."""
    return name.rfc4514_string() or "(empty name)"


def _ca_problem(ca: x509.Certificate, below: int) -> str | None:
    """Why ``ca`` may not issue a certificate with ``below`` CA certificates under it (None: it may)."""
    exts = ca.extensions
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        if ca.version is x509.Version.v1:
            bc = None  # old v1 roots have no extensions; they are in the store on purpose
        else:
            return "is not a CA certificate (no basicConstraints)"
    if bc is not None:
        if not bc.ca:
            return "is not a CA certificate (basicConstraints cA is false)"
        if bc.path_length is not None and below > bc.path_length:
            return f"allows {bc.path_length} CA certificate(s) below it (pathLenConstraint), the path has {below}"
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return None if ku.key_cert_sign else "may not sign certificates (keyUsage without keyCertSign)"


def _link_problem(cert: x509.Certificate, ca: x509.Certificate, below: int) -> str | None:
    """Why ``ca`` did not issue ``cert`` (None: the link holds)."""
    problem = _ca_problem(ca, below)
    if problem is not None:
        return f"{name_of(ca.subject)} {problem}"
    issued = cert.not_valid_before_utc
    if not ca.not_valid_before_utc <= issued <= ca.not_valid_after_utc:
        return (f"{name_of(cert.subject)} was issued {issued:%Y-%m-%d}, outside the validity of its issuer "
                f"{name_of(ca.subject)} ({ca.not_valid_before_utc:%Y-%m-%d} to {ca.not_valid_after_utc:%Y-%m-%d})")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return f"the signature of {name_of(ca.subject)} on {name_of(cert.subject)} does not verify"
    return None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def chain_to_store(cert: x509.Certificate, store: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """The verified path ``[cert, issuer, ..., last store certificate]``; ChainError otherwise.

    Tries every store certificate of the right name at each step (vendors reissue CAs under the
    same name with new keys), so one stale certificate does not hide a good path."""
    pool = list(store)
    problems: list[str] = []

    def extend(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        tip = path[-1]
        if len(path) > 1 and _self_signed(tip):
            return path  # a root: nothing above it
        candidates = [c for c in pool if c.subject == tip.issuer and c not in path]
        if not candidates:
            return path if len(path) > 1 else None  # a store certificate whose issuer is elsewhere
        if len(path) >= MAX_DEPTH:
            problems.append(f"no path of at most {MAX_DEPTH} certificates")
            return None
        below = len(path) - 1  # CA certificates between ``tip`` and the EK cert, ``tip`` included
        for ca in candidates:
            problem = _link_problem(tip, ca, below)
            if problem is not None:
                problems.append(problem)
                continue
            found = extend([*path, ca])
            if found is not None:
                return found
        return None

    found = extend([cert])
    if found is not None:
        return found
    if problems:
        raise ChainError("; ".join(dict.fromkeys(problems)))
    raise ChainError(f"not issued by a CA of the EK trust store (issuer {name_of(cert.issuer)})")


def issued_by_any(cert: x509.Certificate, store: Iterable[x509.Certificate]) -> bool:
    """True when ``cert`` chains to ``store`` (:func:`chain_to_store`)."""
    try:
        chain_to_store(cert, store)
    except ChainError:
        return False
    return True
