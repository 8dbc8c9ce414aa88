"""The agent's persistent state in ``data_dir``: its id, NK + self-signed mTLS cert, AK blobs.

Files (all written atomically; secrets 0600 in a 0700 ``data_dir``, whatever the umask):

    uuid                  the generated agent id (only for ``uuid = generate``)
    nk-private.pem        the NK (RSA-2048, PKCS#8), 0600
    nk-cert.pem           the agent's self-signed HTTPS cert (the registered ``mtls_cert``)
    ak.json               AK public/private blobs (base64) + algorithms, for Tpm.load_ak
    revocation-seen.json  ids of revocation notices already acted on

The NK is the key the tenant encrypts U to (keys/pubkey) and whose PEM PCR 16 binds; the mTLS
cert is made with the same key, as upstream's agent does.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import uuid as uuidlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keytrio.actors.common.private_files import private_dir, write_private
from keytrio.actors.common.tls import check_private_key

NK_KEY = "nk-private.pem"
NK_CERT = "nk-cert.pem"
UUID_FILE = "uuid"
AK_FILE = "ak.json"
SEEN_FILE = "revocation-seen.json"

CERT_DAYS = 3650


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    return private_dir(path, mode)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temp file made ``mode`` first, fsync, rename: a crash never leaves a
    half-written file, and no byte is ever readable with a wider mode."""
    write_private(path, data, mode)


def load_or_create_nk(data_dir: Path, contact_ip: str) -> tuple[rsa.RSAPrivateKey, str, str]:
    """(NK private key, NK public PEM text, mTLS cert PEM text), created once and kept.

    The cert is re-issued (same key) only when it is missing or unreadable, so a restarted agent
    presents the same ``mtls_cert`` it registered.
    """
    key_path, cert_path = data_dir / NK_KEY, data_dir / NK_CERT
    key: rsa.RSAPrivateKey | None = None
    if key_path.exists():
        check_private_key(key_path)  # readable by others: refuse to start, as ssh does
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError(f"{key_path}: the NK must be an RSA key")
        key = loaded
    if key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_atomic(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        cert_path.unlink(missing_ok=True)  # a cert for an older key is useless
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    cert_pem = None
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            cert = None
        if cert is not None and cert.public_key() == key.public_key():
            cert_pem = cert_path.read_text("ascii")
    if cert_pem is None:
        cert_pem = _self_signed(key, contact_ip)
        write_atomic(cert_path, cert_pem.encode("ascii"), mode=0o644)
    return key, pub_pem, cert_pem


def _self_signed(key: rsa.RSAPrivateKey, contact_ip: str) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keytrio-agent")])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.insert(0, x509.IPAddress(ipaddress.ip_address(contact_ip)))
    except ValueError:
        sans.insert(0, x509.DNSName(contact_ip))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def generated_uuid(data_dir: Path) -> str:
    """The agent id for ``uuid = generate``: made once, then read back."""
    path = data_dir / UUID_FILE
    if path.exists():
        return str(uuidlib.UUID(path.read_text("ascii").strip()))
    value = str(uuidlib.uuid4())
    write_atomic(path, (value + "\n").encode("ascii"), mode=0o644)
    return value


def read_json(path: Path) -> Any:
    if not path.exists():
        return None
    return json.loads(path.read_text("utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))
