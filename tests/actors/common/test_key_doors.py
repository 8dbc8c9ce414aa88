"""A key per door: every kind of key the system issues or pins, presented as a TLS client to every
door (registrar admin, verifier admin and policies, agent keys/quotes/notifications), over real
mTLS sockets to a real registrar, verifier and agent (swtpm), with the answer expected for each.

Keys come from a ``keytrio ca`` CA (the world's own), from an upstream-style CA (leaves without
extended key usage, made with cryptography the way upstream's cv_ca makes them; trusted by every
server beside ours), from the agent (its self-signed cert), the swtpm EK CA, a foreign CA, and
none at all. Each server runs with the default ``require_client_eku = false`` and with ``true``.

Answers: an HTTP status, or ``tls:<why>`` when the server refused the handshake (the reason is the
one the server logged): ``purpose`` (the cert's EKU lacks clientAuth: OpenSSL's purpose check),
``untrusted`` (no chain to a trusted CA), ``no-cert`` (the agent requires one).
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keytrio.actors.ca.authority import REVOCATION_SIGNING, Authority
from keytrio.actors.common import tls
from keytrio.actors.common.private_files import private_dir, write_private
from keytrio.protocol import revocation
from keytrio.testbed.world import Testbed

pytestmark = pytest.mark.swtpm

NONCE = "keydoors0123456789"
DOORS = ("registrar:agents", "verifier:agents", "verifier:allowlists",
         "agent:pubkey", "agent:quotes", "agent:notifications")
OK = {"registrar:agents": "200", "verifier:agents": "200", "verifier:allowlists": "200",
      "agent:pubkey": "200", "agent:quotes": "200", "agent:notifications": "400"}  # {} is no notice


def _all(answer: str) -> dict[str, str]:
    return dict.fromkeys(DOORS, answer)


def _refused_by_app_or_tls(agent_answer: str) -> dict[str, str]:
    """No (acceptable) client cert: the CERT_OPTIONAL servers answer 403, the agent's handshake
    needs a cert (``tls:no-cert``) or answers 403 when the cert is trusted but not acceptable."""
    return {d: ("403" if not d.startswith("agent:") else agent_answer) for d in DOORS}


# -- an upstream-style CA (cv_ca): RSA, leaves with no extended key usage -----------------------------

def _upstream_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "MA"),
                      x509.NameAttribute(NameOID.LOCALITY_NAME, "Lexington"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MITLL"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "53")])


def _upstream_ca(directory: Path) -> dict[str, tuple[Path, Path]]:
    """cacert.crt + server/client/RevocationNotifier pairs as upstream's cv_ca issues them."""
    private_dir(directory)
    now = datetime.datetime.now(datetime.UTC)
    crl_dp = x509.CRLDistributionPoints([x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier("http://localhost:38080/crl")],
        relative_name=None, reasons=None, crl_issuer=None)])
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = _upstream_name("Keylime Certificate Authority")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .add_extension(crl_dp, critical=False)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (directory / "cacert.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out = {}
    for serial, name in enumerate(("server", "client", "RevocationNotifier"), start=2):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (x509.CertificateBuilder().subject_name(_upstream_name(name)).issuer_name(ca.issuer)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("2.16.840.1.113730.1.13"),
                                                          b"SSL Server"), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                .add_extension(crl_dp, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = directory / f"{name}-cert.crt", directory / f"{name}-private.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        out[name] = (cert_path, key_path)
    return out


def _self_signed_with(key: Any, directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed clientAuth cert for ``key`` (what a thief of the key can make)."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return cert_path, key_path


# -- asking a door ----------------------------------------------------------------------------------

def _tls_reason(messages: list[str]) -> str:
    text = " ".join(messages)
    if "unsuitable certificate purpose" in text:
        return "tls:purpose"
    if "did not return a certificate" in text:
        return "tls:no-cert"
    if any(s in text for s in ("unable to get local issuer", "self-signed certificate", "self signed certificate",
                                "unknown ca", "unable to verify the first certificate")):
        return "tls:untrusted"
    return "tls:?" + text


class Doors:
    def __init__(self, tb: Testbed, caplog: pytest.LogCaptureFixture) -> None:
        assert tb.ca is not None and tb.registrar_addresses is not None
        m = tb.machines[0]
        assert m.info is not None
        self.ca = tb.ca.ca
        self.mtls_cert = m.info.mtls_cert
        reg, ver, agent = tb.registrar_url, tb.verifier_url, "https://{}:{}".format(*m.contact)
        self.urls = {
            "registrar:agents": ("GET", f"{reg}/v2.1/agents/"),
            "verifier:agents": ("GET", f"{ver}/v2.1/agents/"),
            "verifier:allowlists": ("GET", f"{ver}/v2.1/allowlists/"),
            "agent:pubkey": ("GET", f"{agent}/v2.1/keys/pubkey"),
            "agent:quotes": ("GET", f"{agent}/v2.1/quotes/identity?nonce={NONCE}"),
            "agent:notifications": ("POST", f"{agent}/v2.1/notifications/revocation"),
        }
        self.caplog = caplog

    async def ask(self, door: str, who: tuple[Path, Path] | None, body: Any = None) -> str:
        method, url = self.urls[door]
        pinned = self.mtls_cert if door.startswith("agent:") else None
        cert, key = who if who is not None else (None, None)
        ctx = tls.client_context([self.ca], cert, key, pinned_server_cert_pem=pinned)
        before = len(self.caplog.records)
        try:  # a new connection per question: each one is a handshake of its own
            async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
                r = await client.request(method, url, json={} if method == "POST" and body is None else body)
        except httpx.TransportError:
            await trio.sleep(0.05)  # let the server task log the refusal
            rejected = [r.getMessage() for r in self.caplog.records[before:] if "rejected" in r.getMessage()]
            return _tls_reason(rejected)
        return str(r.status_code)

    async def row(self, who: tuple[Path, Path] | None) -> dict[str, str]:
        return {door: await self.ask(door, who) for door in DOORS}


def _check(matrix: dict[str, dict[str, str]], expected: dict[str, dict[str, str]]) -> None:
    wrong = {f"{kind} @ {door}": f"got {got}, expected {expected[kind][door]}"
             for kind, row in matrix.items() for door, got in row.items() if got != expected[kind][door]}
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in sorted(wrong.items()))


@pytest.mark.parametrize("strict", [False, True], ids=["default", "require_client_eku"])
async def test_every_key_at_every_door(tmp_path: Path, strict: bool, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    ours = Authority.init(tmp_path / "cv_ca")  # the world's CA: make_cv_ca reuses a complete one
    verifier_client = ours.issue("verifier", "client")
    upstream = _upstream_ca(tmp_path / "upstream_cv_ca")
    foreign = Authority.init(tmp_path / "foreign_ca").issue("intruder", "client")
    trusted = [str(ours.dir / "cacert.crt"), str(tmp_path / "upstream_cv_ca" / "cacert.crt")]
    eku = {"trusted_client_ca": trusted, "require_client_eku": strict}

    async with Testbed(tmp_path, machines=1, registrar_options=eku, verifier_options=eku,
                       machine_options=eku) as tb:
        m = tb.machines[0]
        await tb.enrol(m)  # the tenant hands the notifier key to the verifier (stored in its database)
        doors = Doors(tb, caplog)
        agent_data = m.dir / "agent-data"
        ek_ca = tb.dir / "swtpm-localca"
        # swtpm_localca's signing key, copied 0600 (our client refuses keys others may read)
        write_private(tmp_path / "ek-ca-signkey.pem", (ek_ca / "signkey.pem").read_bytes())
        keys: dict[str, tuple[Path, Path] | None] = {
            "keytrio:tenant": (ours.dir / "client-cert.crt", ours.dir / "client-private.pem"),
            "keytrio:verifier": (verifier_client.cert, verifier_client.key),
            "keytrio:notifier": (ours.dir / "RevocationNotifier-cert.crt", ours.dir / "RevocationNotifier-private.pem"),
            "keytrio:server": (ours.dir / "server-cert.crt", ours.dir / "server-private.pem"),
            "upstream:client": upstream["client"],
            "upstream:notifier": upstream["RevocationNotifier"],
            "upstream:server": upstream["server"],
            "agent:self-signed": (agent_data / "nk-cert.pem", agent_data / "nk-private.pem"),
            "ek-ca": (ek_ca / "issuercert.pem", tmp_path / "ek-ca-signkey.pem"),
            "foreign-ca:client": (foreign.cert, foreign.key),
            "none": None,
        }
        matrix = {kind: await doors.row(who) for kind, who in keys.items()}

        upstream_answer = _refused_by_app_or_tls("403") if strict else OK
        expected = {
            "keytrio:tenant": OK,
            "keytrio:verifier": OK,
            "keytrio:notifier": _all("tls:purpose"),
            "keytrio:server": _all("tls:purpose"),
            "upstream:client": upstream_answer,
            "upstream:notifier": upstream_answer,  # upstream's own gap, closed by require_client_eku
            "upstream:server": upstream_answer,
            "agent:self-signed": _all("tls:untrusted"),
            "ek-ca": _all("tls:untrusted"),
            "foreign-ca:client": _all("tls:untrusted"),
            "none": _refused_by_app_or_tls("tls:no-cert"),
        }
        _check(matrix, expected)

        # the notifier certificate still does its one job: agents accept notices it signs
        notifier_key = serialization.load_pem_private_key(
            (ours.dir / "RevocationNotifier-private.pem").read_bytes(), password=None)
        notifier_cert = x509.load_pem_x509_certificate((ours.dir / "RevocationNotifier-cert.crt").read_bytes())
        assert notifier_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
            x509.ExtendedKeyUsage([REVOCATION_SIGNING])
        msg = revocation.build_message(agent_id=m.agent_id, ip="127.0.0.1", port=1, tpm_policy="{}", meta_data="{}",
                                       event_time="now", event_id="test.doors", severity_label="critical",
                                       context={}, notice_id=f"doors-{strict}")
        signed = {"msg": msg, "signature": revocation.sign_message(notifier_key, msg)}  # type: ignore[arg-type]
        assert await doors.ask("agent:notifications", keys["keytrio:tenant"], signed) == "200"


async def test_verifier_database_opens_no_door(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Whoever reads the verifier's database gets the notifier's private key: with it (and the
    notifier's public certificate, or a certificate of their own) every door stays shut."""
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    async with Testbed(tmp_path, machines=1) as tb:
        m = tb.machines[0]
        assert tb.ca is not None
        await tb.enrol(m)
        db = sqlite3.connect(tmp_path / "verifier" / "verifier.sqlite")
        try:
            (stolen_pem,) = db.execute("SELECT revocation_key FROM verifier_agents WHERE agent_id = ?",
                                       (m.agent_id,)).fetchone()
        finally:
            db.close()
        assert stolen_pem and "PRIVATE KEY" in stolen_pem
        loot = tmp_path / "loot"
        private_dir(loot)
        write_private(loot / "notifier-key.pem", stolen_pem.encode())
        stolen = serialization.load_pem_private_key(stolen_pem.encode(), password=None)
        doors = Doors(tb, caplog)
        with_public_cert = await doors.row((tb.ca.revocation_cert, loot / "notifier-key.pem"))
        with_own_cert = await doors.row(_self_signed_with(stolen, loot, "thief"))
        _check({"notifier cert": with_public_cert, "own cert": with_own_cert},
               {"notifier cert": _all("tls:purpose"), "own cert": _all("tls:untrusted")})
