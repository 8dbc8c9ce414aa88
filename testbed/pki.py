"""The testbed's server-components CA, written in upstream Keylime's ``cv_ca`` file layout.

One CA issues the registrar/verifier server certificate, the client certificate that the tenant
and the verifier present, and the RSA revocation-notifier pair whose private key the tenant
enrols with the verifier and whose certificate every agent trusts. trustme makes the CA and
the TLS leaves (ECDSA); the revocation pair is RSA because notices are RSA-PSS signed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

CA_CERT = "cacert.crt"
SERVER_CERT, SERVER_KEY = "server-cert.crt", "server-private.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.crt", "client-private.pem"
REVOCATION_CERT, REVOCATION_KEY = "RevocationNotifier-cert.crt", "RevocationNotifier-private.pem"


@dataclass(frozen=True)
class CaFiles:
    """Paths of one ``cv_ca`` directory."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.dir / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.dir / SERVER_KEY

    @property
    def client_cert(self) -> Path:
        return self.dir / CLIENT_CERT

    @property
    def client_key(self) -> Path:
        return self.dir / CLIENT_KEY

    @property
    def revocation_cert(self) -> Path:
        return self.dir / REVOCATION_CERT

    @property
    def revocation_key(self) -> Path:
        return self.dir / REVOCATION_KEY


def make_cv_ca(directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> CaFiles:
    """Create (or reuse, when complete) a server-components CA in ``directory``."""
    files = CaFiles(Path(directory))
    wanted = (files.ca, files.server_cert, files.server_key, files.client_cert, files.client_key,
              files.revocation_cert, files.revocation_key)
    if all(p.is_file() for p in wanted):
        return files
    files.dir.mkdir(parents=True, exist_ok=True)
    files.dir.chmod(0o700)
    ca = trustme.CA(organization_name="keytrio testbed")
    ca.cert_pem.write_to_path(str(files.ca))
    server = ca.issue_cert(*hosts, common_name="keytrio-server")
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client = ca.issue_cert("client.keytrio.test", common_name="keytrio-client")
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    _revocation_pair(ca, files)
    for key in (files.server_key, files.client_key, files.revocation_key):
        key.chmod(0o600)
    return files


def _revocation_pair(ca: trustme.CA, files: CaFiles) -> None:
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RevocationNotifier")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    files.revocation_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.revocation_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
