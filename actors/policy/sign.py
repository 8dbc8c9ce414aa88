"""Sign runtime policies into DSSE envelopes (ECDSA, as ``keylime-policy sign runtime -b ecdsa``)
and verify them with the verifier's own loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keytrio.actors.common.private_files import write_private
from keytrio.actors.policy.create import PolicyToolError
from keytrio.protocol import dsse
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.runtime_policy import RuntimePolicy, load_policy


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise PolicyToolError(f"--key {path}: unreadable ({exc.strerror or exc})") from exc
    except (ValueError, TypeError) as exc:
        raise PolicyToolError(f"--key {path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PolicyToolError(f"--key {path}: DSSE policy signing needs an ECDSA (EC) key")
    return key


def new_key(path: str | os.PathLike[str], *, curve: ec.EllipticCurve | None = None) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    """A fresh EC key written to ``path`` (0600); its public key goes to ``<path>.pub`` (returned)."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    p = Path(path)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    write_private(p, data)  # 0600 whatever the umask, also over an older, wider file
    pub = p.with_name(p.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def sign_policy(policy: bytes, key: ec.EllipticCurvePrivateKey, *, certificate: bytes | None = None) -> str:
    """The DSSE envelope (JSON text) of a plain policy; the policy is validated first."""
    try:
        load_policy(policy)
    except ProtocolError as exc:
        raise PolicyToolError(f"the policy is not valid: {exc}") from exc
    if dsse.is_envelope(_json_or_none(policy)):
        raise PolicyToolError("the policy is already a DSSE envelope")
    cert = None
    if certificate is not None:
        try:
            cert = x509.load_pem_x509_certificate(certificate)
        except ValueError as exc:
            raise PolicyToolError("--cert: not a PEM certificate") from exc
    try:
        return dsse.sign_envelope(policy, dsse.KEYLIME_PAYLOAD_TYPE, key, certificate=cert)
    except ProtocolError as exc:
        raise PolicyToolError(str(exc)) from exc


def verify_policy(envelope: bytes, key: bytes) -> RuntimePolicy:
    """The policy inside ``envelope`` when a signature by ``key`` (EC public key or certificate,
    PEM/DER) verifies and the payload is a valid policy; ProtocolError (DsseError/PolicyError)
    otherwise."""
    return load_policy(envelope, signing_key=key)


def _json_or_none(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None
