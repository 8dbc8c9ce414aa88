"""Test PKI for actor tests: a trustme server-components CA, a foreign CA, and an agent-style
self-signed cert, all written as PEM files (the tls.py functions take paths)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keytrio.actors.common.private_files import write_private

if TYPE_CHECKING:
    from tests.actors.tenant_support import World


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path

    @property
    def pem(self) -> str:
        return self.cert.read_text()


@dataclass(frozen=True)
class Pki:
    ca: Path  # the server-components CA (PEM)
    other_ca: Path  # an unrelated CA
    server: CertFiles  # issued by ca for 127.0.0.1 / localhost
    client: CertFiles  # issued by ca (tenant / verifier client cert)
    other_client: CertFiles  # issued by other_ca
    agent: CertFiles  # self-signed, like an agent's mtls_cert
    other_agent: CertFiles  # another self-signed one


def _write_leaf(ca: trustme.CA, directory: Path, name: str, *identities: str) -> CertFiles:
    leaf = ca.issue_cert(*identities)
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    # cert file holds the leaf (and no chain): clients send just their leaf
    cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    write_private(key, leaf.private_key_pem.bytes())  # actors refuse keys others can read
    return CertFiles(cert, key)


def _self_signed(directory: Path, name: str) -> CertFiles:
    """An agent-style self-signed server cert (no CA flag, no keyCertSign)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return CertFiles(cert_path, key_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    return Pki(
        ca=d / "ca.pem",
        other_ca=d / "other-ca.pem",
        server=_write_leaf(ca, d, "server", "127.0.0.1", "localhost"),
        client=_write_leaf(ca, d, "client", "client.keytrio.test"),
        other_client=_write_leaf(other, d, "other-client", "client.keytrio.test"),
        agent=_self_signed(d, "agent"),
        other_agent=_self_signed(d, "other-agent"),
    )


@pytest.fixture
async def world(pki: Pki, tmp_path: Path) -> AsyncIterator[World]:
    """A real registrar and verifier over mTLS (tests/actors/tenant_support.py), agents on demand."""
    from tests.actors.tenant_support import world_running  # imported late: it starts actors

    async with world_running(pki, tmp_path) as w:
        yield w
