"""The registrar over real sockets: plain HTTP for agents, mTLS for tenants/verifiers, SQLite.

Credential activation is real: with swtpm (the TPM decrypts the MakeCredential blob) and with a
software TPM whose EK private key we hold (tests/actors/registrar_support.py).
"""

from __future__ import annotations

import argparse
import base64
import logging
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss.constants import TPMA_OBJECT

from keytrio.actors.common.config import ConfigError
from keytrio.actors.registrar import cli
from keytrio.actors.registrar.actor import Registrar
from keytrio.actors.registrar.config import default_config, load_config
from keytrio.protocol import credential
from keytrio.protocol.ekcert import trim_der as _trim_der
from keytrio.protocol.versions import SERVER_VERSIONS
from tests.actors.envelope_support import envelope
from tests.actors.registrar_support import (
    AK_ATTRS,
    BAD_IDS,
    GOOD_IDS,
    EkCa,
    SoftTpm,
    ak_public,
    b64,
    registrar_config,
    running_registrar,
)

A = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
B = "d432fbb3-d2f1-4a97-9ef7-75bd81c00001"


# --- the real round trip on swtpm ------------------------------------------------------------------


@pytest.mark.swtpm
@pytest.mark.parametrize("ek_alg", ["rsa2048", "ecc384"])
async def test_register_activate_with_swtpm(tpm, swtpm, pki, tmp_path, ek_alg):
    from keytrio.testbed.swtpm_state import ek_ca_certs

    store_dir = tmp_path / "tpm_cert_store"
    store_dir.mkdir()
    for pem in ek_ca_certs(swtpm.state_dir):
        shutil.copy(pem, store_dir / pem.name)
    cfg = registrar_config(pki, tmp_path / "reg", require_ek_cert=True, tpm_cert_store=str(store_dir))
    ek = await tpm.endorsement_key(alg=ek_alg)
    ak = await tpm.create_ak(ek)
    assert ek.cert_der is not None
    agent_id = str(uuid.uuid4())
    body = {
        "ek_tpm": b64(ek.public),
        "aik_tpm": b64(ak.public),
        "ekcert": b64(ek.cert_der),
        "mtls_cert": pki.agent.pem,
        "ip": "127.0.0.1",
        "port": 9002,
    }
    async with running_registrar(cfg, pki) as reg:
        r = await reg.register(agent_id, body)
        blob = envelope(r, 200)["results"]["blob"]
        cred = await tpm.activate_credential(ak, ek, base64.b64decode(blob))
        assert len(cred) == credential.CREDENTIAL_LENGTH
        envelope(await reg.activate(agent_id, credential.activation_auth_tag(cred, agent_id)), 200)

        rec = envelope(await reg.record(agent_id), 200)["results"]
        assert rec["ek_tpm"] == b64(ek.public)
        assert rec["aik_tpm"] == b64(ak.public)
        assert x509.load_der_x509_certificate(
            base64.b64decode(rec["ekcert"])
        ) == x509.load_der_x509_certificate(_trim_der(ek.cert_der))
        assert rec["mtls_cert"] == pki.agent.pem
        assert (rec["ip"], rec["port"], rec["regcount"]) == ("127.0.0.1", 9002, 1)

        first = rec

        # anyone can replay the agent's public EK/AK/EK cert: the active record stays what GET answers
        for port in (9003, 9004):
            envelope(await reg.register(agent_id, {**body, "port": port, "mtls_cert": pki.other_agent.pem}), 200)
            assert envelope(await reg.record(agent_id), 200)["results"] == first
        # a wrong tag (whoever replayed cannot decrypt the blob) discards it: still the first record
        envelope(await reg.activate(agent_id, credential.activation_auth_tag(b"w" * 32, agent_id)), 400)
        assert envelope(await reg.record(agent_id), 200)["results"] == first

        # the agent restarts: same identity, new port -> visible once activated, not before
        r = await reg.register(agent_id, {**body, "port": 9003, "mtls_cert": pki.other_agent.pem})
        blob = envelope(r, 200)["results"]["blob"]
        assert envelope(await reg.record(agent_id), 200)["results"] == first
        cred = await tpm.activate_credential(ak, ek, base64.b64decode(blob))
        envelope(await reg.activate(agent_id, credential.activation_auth_tag(cred, agent_id)), 200)
        rec = envelope(await reg.record(agent_id), 200)["results"]
        assert (rec["port"], rec["regcount"], rec["mtls_cert"]) == (9003, 2, pki.other_agent.pem)
        assert rec["aik_tpm"] == first["aik_tpm"]

        # another AK under the same uuid: refused, nothing changes
        before = await reg.rows()
        ak2 = await tpm.create_ak(ek)
        envelope(await reg.register(agent_id, {**body, "aik_tpm": b64(ak2.public)}), 403)
        assert await reg.rows() == before
        assert envelope(await reg.record(agent_id), 200)["results"]["regcount"] == 2


# --- registration and activation -------------------------------------------------------------------


async def test_every_version_and_activation_route(config, pki, softs):
    soft = softs[0]
    async with running_registrar(config, pki) as reg:
        routes = [
            ("PUT", "/v{}/agents/{}/activate"),
            ("POST", "/v{}/agents/{}/activate"),
            ("PUT", "/v{}/agents/{}"),
        ]
        for i, version in enumerate(SERVER_VERSIONS):
            agent_id = str(uuid.UUID(int=i + 1))
            r = await reg.register(agent_id, soft.body(), version=version)
            cred = soft.activate(envelope(r, 200)["results"]["blob"])
            method, path = routes[i % len(routes)]
            tag = credential.activation_auth_tag(cred, agent_id)
            r = await reg.agent.request(method, path.format(version, agent_id), json={"auth_tag": tag})
            envelope(r, 200)
            r = await reg.admin.get(f"/v{version}/agents/{agent_id}")
            assert envelope(r, 200)["results"]["regcount"] == 1
        r = await reg.agent.post(f"/v9.9/agents/{A}", json=soft.body())
        assert "API version not supported" in envelope(r, 400)["status"]


async def test_reregistration_and_identity_mismatch(config, pki, softs):
    s0, s1 = softs[0], softs[1]
    ca = EkCa.new()
    s0_cert = SoftTpm(s0.ek_key, s0.ak_key, ca.issue(s0.ek_key.public_key()))
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, s0_cert, mtls_cert=pki.agent.pem)
        await reg.enroll(A, s0_cert, mtls_cert=pki.other_agent.pem, ip="10.0.0.7", port=9100)
        rec = envelope(await reg.record(A), 200)["results"]
        assert (rec["regcount"], rec["ip"], rec["port"], rec["mtls_cert"]) == (
            2,
            "10.0.0.7",
            9100,
            pki.other_agent.pem,
        )
        assert rec["ekcert"] == b64(s0_cert.ekcert_der)

        before = await reg.rows()
        other_cert = ca.issue(s1.ek_key.public_key())
        for changes in (
            {"ek_tpm": s1.ek_tpm, "ekcert": None},  # another EK, no cert
            {"aik_tpm": s1.aik_tpm},  # another AK
            {"ek_tpm": s1.ek_tpm, "ekcert": b64(other_cert)},  # another EK with its own cert
            {"ekcert": None},  # the EK cert dropped
            {"ekcert": b64(ca.issue(s0.ek_key.public_key()))},  # another cert for the same EK
        ):
            r = await reg.register(A, s0_cert.body(**changes))
            assert "different EK" in envelope(r, 403)["status"]
            assert await reg.rows() == before
        assert envelope(await reg.record(A), 200)["results"]["regcount"] == 2

        # the EK cert may come as PEM too; it is stored (and served) as base64 DER
        pem = x509.load_der_x509_certificate(s0_cert.ekcert_der).public_bytes(Encoding.PEM)
        await reg.enroll(A, s0_cert, ekcert=pem.decode())
        assert envelope(await reg.record(A), 200)["results"]["regcount"] == 3


async def test_wrong_tag_removes_a_first_registration(config, pki, softs, caplog):
    caplog.set_level(logging.DEBUG)
    soft = softs[0]
    async with running_registrar(config, pki) as reg:
        r = await reg.register(A, soft.body())
        cred = soft.activate(envelope(r, 200)["results"]["blob"])
        right = credential.activation_auth_tag(cred, A)
        wrong = credential.activation_auth_tag(b"x" * 32, A)
        r = await reg.activate(A, wrong)
        doc = envelope(r, 400)
        assert "removed" in doc["status"]
        assert right not in r.text and right.upper() not in r.text
        assert await reg.rows() == []
        envelope(await reg.activate(A, right), 404)  # too late: the registration is gone
        envelope(await reg.record(A), 404)
        assert envelope(await reg.admin.get("/v2.1/agents/"), 200)["results"]["uuids"] == []
    # the registrar logged the events, but never the credential or a tag
    assert "event=activation.wrong_removed" in caplog.text
    for secret in (right, wrong, cred.decode()):
        assert secret not in caplog.text


async def test_wrong_tag_on_reregistration_rolls_back(config, pki, softs):
    soft = softs[0]
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, soft, port=9001)
        active = await reg.rows()
        before = envelope(await reg.record(A), 200)["results"]
        r = await reg.register(A, soft.body(port=9555))
        envelope(r, 200)
        assert envelope(await reg.record(A), 200)["results"] == before  # pending: GET unchanged
        r = await reg.activate(A, credential.activation_auth_tag(b"y" * 32, A))
        assert "discarded" in envelope(r, 400)["status"]
        # back to the activated record: replaying the public EK/AK cannot take an agent over
        assert await reg.rows() == active
        rec = envelope(await reg.record(A), 200)["results"]
        assert (rec["port"], rec["regcount"]) == (9001, 1)


async def test_repeated_activation_and_wrong_tag_on_active_agent(config, pki, softs):
    soft = softs[0]
    async with running_registrar(config, pki) as reg:
        r = await reg.register(A, soft.body())
        tag = credential.activation_auth_tag(soft.activate(r.json()["results"]["blob"]), A)
        envelope(await reg.activate(A, tag), 200)
        before = await reg.rows()
        envelope(await reg.activate(A, tag.upper()), 200)  # a retry after a lost answer
        envelope(await reg.activate(A, credential.activation_auth_tag(b"z" * 32, A)), 400)
        assert await reg.rows() == before
        assert envelope(await reg.record(A), 200)["results"]["regcount"] == 1


async def test_unactivated_registration_is_dropped_by_the_sweeper(pki, tmp_path, softs):
    cfg = registrar_config(pki, tmp_path / "reg", activation_timeout=0.3)
    soft = softs[0]
    async with running_registrar(cfg, pki) as reg:
        await reg.enroll(B, softs[1])  # activated in time: stays
        r = await reg.register(A, soft.body())
        cred = soft.activate(envelope(r, 200)["results"]["blob"])
        uuids = envelope(await reg.admin.get("/v2.1/agents/"), 200)["results"]["uuids"]
        assert sorted(uuids) == [A, B]
        # the sweeper (every timeout / 4) deletes the row: watched in the table, never through the
        # API (whose reads also apply the expiry, see the next test)
        with trio.fail_after(30):  # a hang guard only
            while any(row[0] == A for row in await reg.rows()):
                await trio.sleep(0.05)
        assert envelope(await reg.admin.get("/v2.1/agents/"), 200)["results"]["uuids"] == [B]
        envelope(await reg.activate(A, credential.activation_auth_tag(cred, A)), 404)
        envelope(await reg.record(B), 200)


async def test_expiry_is_also_applied_on_access(pki, tmp_path, softs):
    """With a long timeout the sweeper never runs here; a fake wall clock passes the deadline."""
    now = [1_700_000_000.0]
    cfg = registrar_config(pki, tmp_path / "reg", activation_timeout=600.0)
    soft = softs[0]
    async with running_registrar(cfg, pki, clock=lambda: now[0]) as reg:
        await reg.enroll(B, soft, port=9001)
        r = await reg.register(A, soft.body())
        cred_a = soft.activate(envelope(r, 200)["results"]["blob"])
        r = await reg.register(B, soft.body(port=9999))  # a re-registration of an active agent
        cred_b = soft.activate(envelope(r, 200)["results"]["blob"])
        now[0] += 601
        envelope(await reg.activate(A, credential.activation_auth_tag(cred_a, A)), 404)
        r = await reg.activate(B, credential.activation_auth_tag(cred_b, B))
        envelope(r, 400)  # rolled back to the earlier activation, whose tag this is not
        rec = envelope(await reg.record(B), 200)["results"]
        assert (rec["port"], rec["regcount"]) == (9001, 1)
        assert [row[0] for row in await reg.rows()] == [B]


async def test_require_ek_cert(pki, tmp_path, softs):
    ca, foreign = EkCa.new(), EkCa.new("Foreign CA")
    store = tmp_path / "store"
    ca.write(store)
    (store / "README.txt").write_text("not a certificate, ignored")
    cfg = registrar_config(pki, tmp_path / "reg", require_ek_cert=True, tpm_cert_store=str(store))
    s = softs[0]
    good = SoftTpm(s.ek_key, s.ak_key, ca.issue(s.ek_key.public_key()))
    bad = SoftTpm(s.ek_key, s.ak_key, foreign.issue(s.ek_key.public_key()))
    async with running_registrar(cfg, pki) as reg:
        assert "required" in envelope(await reg.register(A, s.body()), 400)["status"]
        assert "trusted TPM CA" in envelope(await reg.register(A, bad.body()), 403)["status"]
        assert await reg.rows() == []
        await reg.enroll(A, good)


# --- the mTLS API -----------------------------------------------------------------------------------


async def test_admin_api_over_mtls(config, pki, softs):
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, softs[0])
        await reg.enroll(B, softs[1])
        assert envelope(await reg.admin.get("/v2.1/agents/"), 200)["results"]["uuids"] == [A, B]
        assert envelope(await reg.admin.get("/v2.5/agents"), 200)["results"]["uuids"] == [A, B]
        rec = envelope(await reg.admin.get(f"/v2.0/agents/{A.upper()}"), 200)["results"]
        assert set(rec) == {"aik_tpm", "ek_tpm", "ekcert", "mtls_cert", "ip", "port", "regcount"}
        assert (rec["ek_tpm"], rec["aik_tpm"], rec["ekcert"]) == (softs[0].ek_tpm, softs[0].aik_tpm, None)
        envelope(await reg.admin.delete(f"/v2.1/agents/{A}"), 200)
        envelope(await reg.admin.get(f"/v2.1/agents/{A}"), 404)
        envelope(await reg.admin.delete(f"/v2.1/agents/{A}"), 404)
        assert envelope(await reg.admin.get("/v2.1/agents/"), 200)["results"]["uuids"] == [B]

        # /version is public on both ports
        for client in (reg.anonymous, reg.agent):
            results = envelope(await client.get("/version"), 200)["results"]
            assert results == {"current_version": "2.5", "supported_versions": [*SERVER_VERSIONS, "3.0"]}

        # a client cert from another CA fails the TLS handshake (CERT_OPTIONAL still verifies a
        # presented cert); the server keeps serving
        from keytrio.actors.common.tls import client_context

        foreign = client_context([pki.ca], pki.other_client.cert, pki.other_client.key)
        async with httpx.AsyncClient(base_url=reg.https_url, verify=foreign, timeout=5) as c:
            with pytest.raises(httpx.TransportError):
                await c.get("/v2.1/agents/")
        envelope(await reg.admin.get("/v2.1/agents/"), 200)

        # the admin routes do not exist on the agent port
        envelope(await reg.agent.get("/v2.1/agents/"), 404)
        envelope(await reg.agent.delete(f"/v2.1/agents/{B}"), 405)
        envelope(await reg.admin.get(f"/v2.1/agents/{B}"), 200)


# --- bad input: every endpoint, no state change, the server keeps serving -----------------------------

_BIG = "A" * (1 << 20)
_BAD_PUBLIC = b64(b"\x00\x05hello")


def _body(kind: str, s: SoftTpm, other: SoftTpm, pki) -> object:
    """The request body of a bad-input case (a dict for JSON, bytes for a raw body)."""
    ca = EkCa.new()
    cases = {
        "malformed": b'{"ek_tpm": ',
        "array": b"[1, 2]",
        "not_utf8": b"\xff\xfe{}",
        "missing_ek": {k: v for k, v in s.body().items() if k != "ek_tpm"},
        "missing_aik": {k: v for k, v in s.body().items() if k != "aik_tpm"},
        "ek_int": s.body(ek_tpm=12),
        "ek_bad_b64": s.body(ek_tpm="@@not base64@@"),
        "ek_undecodable": s.body(ek_tpm=_BAD_PUBLIC),
        "ek_trailing": s.body(ek_tpm=b64(s.ek.marshal() + b"\x00")),
        "ek_is_signing_key": s.body(ek_tpm=s.aik_tpm),
        "aik_undecodable": s.body(aik_tpm=_BAD_PUBLIC),
        "aik_is_decrypt_key": s.body(aik_tpm=s.ek_tpm),
        "aik_not_restricted": s.body(
            aik_tpm=b64(ak_public(s.ak_key, attrs=AK_ATTRS & ~TPMA_OBJECT.RESTRICTED).marshal())
        ),
        "ekcert_wrong_key": s.body(ekcert=b64(ca.issue(other.ek_key.public_key()))),
        "ekcert_garbage": s.body(ekcert=b64(b"\x30\x03abc")),
        "ekcert_bad_pem": s.body(
            ekcert="-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----"
        ),
        "ekcert_int": s.body(ekcert=5),
        "mtls_not_pem": s.body(mtls_cert="hello"),
        "mtls_wrong_label": s.body(mtls_cert=pki.server.key.read_text()),
        "mtls_int": s.body(mtls_cert=7),
        "port_text": s.body(port="abc"),
        "port_zero": s.body(port=0),
        "port_big": s.body(port=70000),
        "ip_bad": s.body(ip="bad ip!"),
        "ip_list": s.body(ip=["127.0.0.1"]),
        "identity_mismatch": s.body(ek_tpm=other.ek_tpm),
        "oversized": s.body(mtls_cert=_BIG),
        "tag_missing": {},
        "tag_int": {"auth_tag": 5},
        "tag_not_hex": {"auth_tag": "z" * 96},
        "tag_short": {"auth_tag": "ab" * 10},
        "tag_oversized": {"auth_tag": _BIG},
        "valid": s.body(),
        "none": None,
    }
    return cases[kind]


# (name, port, method, path, body kind, expected code); {A} is active, {B} has a pending
# first registration, {U} is unknown, {X} is not a valid agent id.
BAD_INPUT = [
    ("reg-malformed-json", "http", "POST", "/v2.1/agents/{U}", "malformed", 400),
    ("reg-json-array", "http", "POST", "/v2.1/agents/{U}", "array", 400),
    ("reg-not-utf8", "http", "POST", "/v2.1/agents/{U}", "not_utf8", 400),
    ("reg-missing-ek", "http", "POST", "/v2.1/agents/{U}", "missing_ek", 400),
    ("reg-missing-aik", "http", "POST", "/v2.1/agents/{U}", "missing_aik", 400),
    ("reg-ek-wrong-type", "http", "POST", "/v2.1/agents/{U}", "ek_int", 400),
    ("reg-ek-bad-base64", "http", "POST", "/v2.1/agents/{U}", "ek_bad_b64", 400),
    ("reg-ek-undecodable", "http", "POST", "/v2.1/agents/{U}", "ek_undecodable", 400),
    ("reg-ek-trailing-bytes", "http", "POST", "/v2.1/agents/{U}", "ek_trailing", 400),
    ("reg-ek-is-signing-key", "http", "POST", "/v2.1/agents/{U}", "ek_is_signing_key", 400),
    ("reg-aik-undecodable", "http", "POST", "/v2.1/agents/{U}", "aik_undecodable", 400),
    ("reg-aik-decrypt-key", "http", "POST", "/v2.1/agents/{U}", "aik_is_decrypt_key", 400),
    ("reg-aik-not-restricted", "http", "POST", "/v2.1/agents/{U}", "aik_not_restricted", 400),
    ("reg-ekcert-wrong-key", "http", "POST", "/v2.1/agents/{U}", "ekcert_wrong_key", 400),
    ("reg-ekcert-garbage", "http", "POST", "/v2.1/agents/{U}", "ekcert_garbage", 400),
    ("reg-ekcert-bad-pem", "http", "POST", "/v2.1/agents/{U}", "ekcert_bad_pem", 400),
    ("reg-ekcert-wrong-type", "http", "POST", "/v2.1/agents/{U}", "ekcert_int", 400),
    ("reg-mtls-not-pem", "http", "POST", "/v2.1/agents/{U}", "mtls_not_pem", 400),
    ("reg-mtls-not-cert", "http", "POST", "/v2.1/agents/{U}", "mtls_wrong_label", 400),
    ("reg-mtls-wrong-type", "http", "POST", "/v2.1/agents/{U}", "mtls_int", 400),
    ("reg-port-text", "http", "POST", "/v2.1/agents/{U}", "port_text", 400),
    ("reg-port-zero", "http", "POST", "/v2.1/agents/{U}", "port_zero", 400),
    ("reg-port-too-big", "http", "POST", "/v2.1/agents/{U}", "port_big", 400),
    ("reg-ip-bad", "http", "POST", "/v2.1/agents/{U}", "ip_bad", 400),
    ("reg-ip-wrong-type", "http", "POST", "/v2.1/agents/{U}", "ip_list", 400),
    ("reg-invalid-uuid", "http", "POST", "/v2.1/agents/{X}", "valid", 400),
    ("reg-invalid-uuid-no-body", "http", "POST", "/v2.1/agents/{X}", "none", 400),
    ("reg-identity-mismatch", "http", "POST", "/v2.1/agents/{A}", "identity_mismatch", 403),
    ("reg-identity-mismatch-pending", "http", "POST", "/v2.1/agents/{B}", "identity_mismatch", 403),
    ("reg-oversized", "http", "POST", "/v2.1/agents/{U}", "oversized", 413),
    ("reg-bad-version", "http", "POST", "/v9.9/agents/{U}", "none", 400),
    ("act-malformed-json", "http", "PUT", "/v2.1/agents/{B}/activate", "malformed", 400),
    ("act-missing-tag", "http", "PUT", "/v2.1/agents/{B}/activate", "tag_missing", 400),
    ("act-tag-wrong-type", "http", "POST", "/v2.1/agents/{B}/activate", "tag_int", 400),
    ("act-tag-not-hex", "http", "PUT", "/v2.1/agents/{B}", "tag_not_hex", 400),
    ("act-tag-short", "http", "PUT", "/v2.1/agents/{B}/activate", "tag_short", 400),
    ("act-tag-oversized", "http", "PUT", "/v2.1/agents/{B}/activate", "tag_oversized", 413),
    ("act-invalid-uuid", "http", "PUT", "/v2.1/agents/{X}/activate", "tag_not_hex", 400),
    ("act-unknown-agent", "http", "PUT", "/v2.1/agents/{U}/activate", "wrong_tag", 404),
    ("act-wrong-tag-active", "http", "PUT", "/v2.1/agents/{A}/activate", "wrong_tag", 400),
    ("act-array", "http", "PUT", "/v2.1/agents/{B}/activate", "array", 400),
    ("admin-list-no-cert", "anon", "GET", "/v2.1/agents/", "none", 403),
    ("admin-get-no-cert", "anon", "GET", "/v2.1/agents/{A}", "none", 403),
    ("admin-delete-no-cert", "anon", "DELETE", "/v2.1/agents/{A}", "none", 403),
    ("admin-get-invalid-uuid", "admin", "GET", "/v2.1/agents/{X}", "none", 400),
    ("admin-get-unknown", "admin", "GET", "/v2.1/agents/{U}", "none", 404),
    ("admin-get-pending", "admin", "GET", "/v2.1/agents/{B}", "none", 404),
    ("admin-delete-invalid-uuid", "admin", "DELETE", "/v2.1/agents/{X}", "none", 400),
    ("admin-delete-unknown", "admin", "DELETE", "/v2.1/agents/{U}", "none", 404),
    ("admin-bad-version", "admin", "GET", "/v2.9/agents/", "none", 400),
    ("admin-post-not-allowed", "admin", "POST", "/v2.1/agents/{A}", "none", 405),
    ("admin-activate-not-here", "admin", "PUT", "/v2.1/agents/{A}/activate", "tag_not_hex", 404),
]


@pytest.mark.parametrize(
    ("port", "method", "path", "kind", "code"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input(config, pki, softs, port, method, path, kind, code):
    s, other = softs[0], softs[1]
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, s)
        envelope(await reg.register(B, s.body()), 200)
        before = await reg.rows()
        client = {"http": reg.agent, "admin": reg.admin, "anon": reg.anonymous}[port]
        url = path.format(A=A, B=B, U="d432fbb3-d2f1-4a97-9ef7-75bd81c0ffff", X="not an id")
        if kind == "wrong_tag":
            body: object = {"auth_tag": credential.activation_auth_tag(b"w" * 32, A)}
        else:
            body = _body(kind, s, other, pki)
        if isinstance(body, bytes):
            r = await client.request(method, url, content=body, headers={"content-type": "application/json"})
        elif body is None:
            r = await client.request(method, url)
        else:
            r = await client.request(method, url, json=body)
        status = envelope(r, code)["status"]
        if "{X}" in path and code == 400:
            assert "agent_id" in status
        assert await reg.rows() == before
        envelope(await reg.agent.get("/version"), 200)  # still serving
        envelope(await reg.admin.get(f"/v2.1/agents/{A}"), 200)


async def test_agent_ids_follow_upstreams_rule(config, pki, softs):
    async with running_registrar(config, pki) as reg:
        for i, aid in enumerate(GOOD_IDS):  # register, activate, read, list, delete under its own id
            await reg.enroll(aid, softs[i % 2])
            rec = envelope(await reg.record(aid), 200)["results"]
            assert rec["aik_tpm"] == softs[i % 2].aik_tpm
        assert sorted(envelope(await reg.admin.get("/v2.1/agents/"), 200)["results"]["uuids"]) == sorted(GOOD_IDS)
        envelope(await reg.record("FOO"), 404)  # ids other than UUIDs are case-sensitive, as upstream's
        envelope(await reg.record(A.upper()), 404)  # a UUID is found whatever its case
        await reg.enroll(A.upper(), softs[0])
        assert envelope(await reg.record(A), 200)["results"]["aik_tpm"] == softs[0].aik_tpm
        before = await reg.rows()
        for aid in BAD_IDS:
            for method, path, body in (("POST", f"/v2.1/agents/{aid}", softs[1].body()),
                                       ("PUT", f"/v2.1/agents/{aid}/activate", {"auth_tag": "ab" * 48})):
                status = envelope(await reg.agent.request(method, path, json=body), 400)["status"]
                assert "agent_id" in status, (aid, status)
            for method in ("GET", "DELETE"):
                envelope(await reg.admin.request(method, f"/v2.1/agents/{aid}"), 400)
        # a slash is a path separator, never part of an id: no route, and nothing changes
        envelope(await reg.agent.post("/v2.1/agents/a/b", json=softs[1].body()), 404)
        assert await reg.rows() == before
        for aid in GOOD_IDS:
            envelope(await reg.admin.delete(f"/v2.1/agents/{aid}"), 200)


# --- durability, isolation, configuration ----------------------------------------------------------


async def test_restart_on_the_same_sqlite_file_keeps_everything(config, pki, softs):
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, softs[0], port=9001)
        r = await reg.register(B, softs[1].body())
        cred_b = softs[1].activate(envelope(r, 200)["results"]["blob"])
        rows = await reg.rows()
    assert (Path(config.data_dir) / "registrar.sqlite").is_file()
    async with running_registrar(config, pki) as reg:
        assert await reg.rows() == rows
        rec = envelope(await reg.record(A), 200)["results"]
        assert (rec["port"], rec["regcount"], rec["ek_tpm"]) == (9001, 1, softs[0].ek_tpm)
        # the pending registration survived too: its credential still activates it
        envelope(await reg.activate(B, credential.activation_auth_tag(cred_b, B)), 200)
        envelope(await reg.record(B), 200)


async def test_two_registrars_in_one_process(pki, tmp_path, softs):
    c1 = registrar_config(pki, tmp_path / "one")
    c2 = registrar_config(pki, tmp_path / "two")
    async with running_registrar(c1, pki) as r1, running_registrar(c2, pki) as r2:
        assert r1.addresses != r2.addresses
        await r1.enroll(A, softs[0])
        await r2.enroll(A, softs[1])  # same id, other identity: independent registrars
        assert envelope(await r1.record(A), 200)["results"]["ek_tpm"] == softs[0].ek_tpm
        assert envelope(await r2.record(A), 200)["results"]["ek_tpm"] == softs[1].ek_tpm


async def test_cancellation_closes_cleanly(config, pki):
    registrar = Registrar(config)
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(registrar.run)
            assert addresses.http[1] and addresses.https[1]
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    with pytest.raises(OSError):  # the port is closed
        await trio.open_tcp_stream(*addresses.http)


def test_config_defaults_and_problems(pki, tmp_path, capsys):
    # the printed default configuration loads back as the defaults
    path = tmp_path / "registrar.toml"
    path.write_text(default_config())
    cfg = load_config(path, env={})
    assert (cfg.port, cfg.tls_port, cfg.activation_timeout, cfg.max_upload_size) == (
        8890,
        8891,
        300.0,
        1 << 20,
    )
    # the environment overrides the file
    cfg = load_config(path, env={"KEYTRIO_REGISTRAR_REQUIRE_EK_CERT": "true"})
    assert cfg.require_ek_cert is True
    # missing TLS files and require_ek_cert without a store are reported together
    with pytest.raises(ConfigError) as info:
        Registrar(load_config(None, env={}, overrides={"data_dir": str(tmp_path), "require_ek_cert": True}))
    text = "\n".join(info.value.problems)
    assert "server_cert" in text and "trusted_client_ca" in text and "tpm_cert_store" in text

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["registrar", "--print-default-config"])
    assert args.func(args) == 0
    assert "activation_timeout = 300.0" in capsys.readouterr().out
    args = parser.parse_args(["registrar", "--config", str(tmp_path / "missing.toml")])
    assert args.func(args) == 2
    assert "no such file" in capsys.readouterr().err
