"""The testbed's server-components CA, written in upstream Keylime's ``cv_ca`` file layout.

One CA issues the registrar/verifier server certificate (serverAuth only), the client certificate
that the tenant and the verifier present (clientAuth only), and the RSA revocation-notifier pair
(keytrio's revocation-signing purpose only, no TLS use) whose private key the tenant enrols with
the verifier and whose certificate every agent trusts. trustme makes the CA; the leaves are made
by `keytrio ca`'s own :func:`make_leaf`, so the testbed's certificates follow the same rules.
Private keys are 0600 in a 0700 directory whatever the umask.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keytrio.actors.ca.authority import make_leaf
from keytrio.actors.common.private_files import private_dir, write_private

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
    private_dir(files.dir)
    ca = trustme.CA(organization_name="keytrio testbed")
    ca.cert_pem.write_to_path(str(files.ca))
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ips = tuple(h for h in hosts if _is_ip(h))
    dns = tuple(h for h in hosts if not _is_ip(h))
    # the leaves of `keytrio ca` (one purpose each), not trustme's (serverAuth + clientAuth)
    leaves = (
        ("keytrio-server", "server", files.server_cert, files.server_key),
        ("keytrio-client", "client", files.client_cert, files.client_key),
        ("RevocationNotifier", "revocation", files.revocation_cert, files.revocation_key),
    )
    for name, kind, cert_path, key_path in leaves:
        cert, key = make_leaf(ca_cert, ca_key, name, kind,  # type: ignore[arg-type]
                              ips=ips if kind == "server" else (), dns=dns if kind == "server" else ())
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
