"""Support code (no tests) for the registrar tests: a software "TPM" (EK + AK key pairs as TPM2B_PUBLICs, with the
TPM's side of ActivateCredential done in Python), an EK-cert CA, and a running registrar with
HTTP clients. The software TPM lets most tests run without swtpm; test_registrar.py also runs the
real round trip against swtpm."""

from __future__ import annotations

import base64
import contextlib
import datetime
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMT_ASYM_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from keytrio.actors.common.tls import client_context
from keytrio.actors.registrar.actor import Registrar, RegistrarAddresses
from keytrio.actors.registrar.config import load_config
from keytrio.actors.registrar.schema import agents
from keytrio.protocol import credential, tpm2
from tests.protocol.tpm2_support import AK_ATTRS, EK_ATTRS

# upstream's rule (keylime.common.validators.valid_agent_id): [\w.-]+; keytrio: at most 80 characters
GOOD_IDS = ["foo", "a.b-c_1", "Foo", "wörk-1", "x" * 80, "0123456789abcdef0123456789abcdef"]
#: path segments as sent (percent-encoded where a client must): space, ':', ';', '%', '<x>', 81
#: characters, '..' (encoded, else clients remove the dot segment), no-break space, tab, NUL
BAD_IDS = ["a%20b", "a:b", "a;b", "a%25b", "%3Cx%3E", "x" * 81, "%2E%2E", "a%C2%A0b", "tab%09there", "a%00"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _spki_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ek_public(key: rsa.RSAPrivateKey) -> TPM2B_PUBLIC:
    sym = TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
    )
    return TPM2B_PUBLIC.from_pem(_spki_pem(key), objectAttributes=EK_ATTRS, symmetric=sym)


def ak_public(key: ec.EllipticCurvePrivateKey, attrs: int = AK_ATTRS) -> TPM2B_PUBLIC:
    scheme = TPMT_ASYM_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return TPM2B_PUBLIC.from_pem(_spki_pem(key), objectAttributes=attrs, scheme=scheme)


def _kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    return KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    ).derive(key)


@dataclass
class SoftTpm:
    """An RSA-2048 EK (AES-128-CFB, sha256 names) and a P-256 ECDSA AK with their private keys."""

    ek_key: rsa.RSAPrivateKey
    ak_key: ec.EllipticCurvePrivateKey
    ekcert_der: bytes | None = None

    @classmethod
    def new(cls) -> SoftTpm:
        return cls(rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()))

    @property
    def ek(self) -> TPM2B_PUBLIC:
        return ek_public(self.ek_key)

    @property
    def ak(self) -> TPM2B_PUBLIC:
        return ak_public(self.ak_key)

    @property
    def ek_tpm(self) -> str:
        return b64(self.ek.marshal())

    @property
    def aik_tpm(self) -> str:
        return b64(self.ak.marshal())

    def activate(self, blob_b64: str) -> bytes:
        """The TPM's ActivateCredential: recover the credential (checks the integrity HMAC)."""
        id_object, secret = credential.parse_credential_blob(base64.b64decode(blob_b64))
        raw_id, raw_secret = bytes(id_object.marshal())[2:], bytes(secret.marshal())[2:]
        seed = self.ek_key.decrypt(
            raw_secret, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"IDENTITY\x00")
        )
        name = tpm2.object_name(self.ak)
        (hlen,) = struct.unpack(">H", raw_id[:2])
        outer, enc = raw_id[2 : 2 + hlen], raw_id[2 + hlen :]
        mac = chmac.HMAC(_kdfa(seed, b"INTEGRITY", b"", 256), hashes.SHA256())
        mac.update(enc + name)
        mac.verify(outer)
        dec = Cipher(algorithms.AES(_kdfa(seed, b"STORAGE", name, 128)), CFB(bytes(16))).decryptor()
        plain = dec.update(enc) + dec.finalize()
        (size,) = struct.unpack(">H", plain[:2])
        return plain[2 : 2 + size]

    def body(self, **changes: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ek_tpm": self.ek_tpm,
            "aik_tpm": self.aik_tpm,
            "ekcert": b64(self.ekcert_der) if self.ekcert_der else None,
            "mtls_cert": None,
            "ip": "127.0.0.1",
            "port": 9002,
        }
        doc.update(changes)
        return doc


@dataclass
class EkCa:
    """A TPM-vendor-like CA that issues EK certificates for given public keys."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, name: str = "Test TPM Vendor CA") -> EkCa:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, public_key: Any) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)

    def write(self, directory: Path, name: str = "vendor-ca.pem") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def registrar_config(pki: Any, data_dir: Path, **overrides: Any):
    values: dict[str, Any] = {
        "ip": "127.0.0.1",
        "port": 0,
        "tls_port": 0,
        "metrics_port": 0,
        "data_dir": str(data_dir),
        "server_cert": str(pki.server.cert),
        "server_key": str(pki.server.key),
        "trusted_client_ca": [str(pki.ca)],
        "activation_timeout": 30.0,
        "graceful_timeout": 0.5,
    }
    values.update(overrides)
    return load_config(None, env={}, overrides=values)


@dataclass
class Running:
    registrar: Registrar
    addresses: RegistrarAddresses
    agent: httpx.AsyncClient  # plain HTTP, base_url = the agent port
    admin: httpx.AsyncClient  # HTTPS with the tenant's client cert
    anonymous: httpx.AsyncClient  # HTTPS without a client cert

    @property
    def http_url(self) -> str:
        return "http://{}:{}".format(*self.addresses.http)

    @property
    def https_url(self) -> str:
        return "https://{}:{}".format(*self.addresses.https)

    async def rows(self) -> list[tuple]:
        """The whole agents table, for "nothing changed" assertions."""
        assert self.registrar.service is not None

        def q(conn: sa.Connection) -> list[tuple]:
            return [tuple(r) for r in conn.execute(sa.select(agents).order_by(agents.c.agent_id))]

        return await self.registrar.service.store.read(q)

    async def register(self, agent_id: str, body: dict[str, Any], version: str = "2.1") -> httpx.Response:
        return await self.agent.post(f"/v{version}/agents/{agent_id}", json=body)

    async def activate(self, agent_id: str, tag: str, version: str = "2.1") -> httpx.Response:
        return await self.agent.put(f"/v{version}/agents/{agent_id}/activate", json={"auth_tag": tag})

    async def enroll(self, agent_id: str, soft: SoftTpm, **changes: Any) -> None:
        """Register + activate with the software TPM; asserts both succeed."""
        r = await self.register(agent_id, soft.body(**changes))
        assert r.status_code == 200, r.text
        cred = soft.activate(r.json()["results"]["blob"])
        r = await self.activate(agent_id, credential.activation_auth_tag(cred, agent_id))
        assert r.status_code == 200, r.text

    async def record(self, agent_id: str) -> httpx.Response:
        return await self.admin.get(f"/v2.1/agents/{agent_id}")


@contextlib.asynccontextmanager
async def running_registrar(config: Any, pki: Any, **kwargs: Any) -> AsyncIterator[Running]:
    registrar = Registrar(config, **kwargs)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(registrar.run)
        admin_ctx = client_context([pki.ca], pki.client.cert, pki.client.key)
        anon_ctx = client_context([pki.ca])
        http = "http://{}:{}".format(*addresses.http)
        https = "https://{}:{}".format(*addresses.https)
        async with (
            httpx.AsyncClient(base_url=http, timeout=10) as agent,
            httpx.AsyncClient(base_url=https, verify=admin_ctx, timeout=10) as admin,
            httpx.AsyncClient(base_url=https, verify=anon_ctx, timeout=10) as anonymous,
        ):
            yield Running(registrar, addresses, agent, admin, anonymous)
        nursery.cancel_scope.cancel()
