"""Registrar API v3.0 beside v2.x, over real sockets and SQLite: the version root, collection-level
registration with the agent id in the body, POST activation, JSON:API error documents on v3 paths,
and the same checks as v2 (EK cert chain, replay-safe re-registration, nothing stored on refusal).
The full cycle runs on swtpm (the TPM decrypts the MakeCredential blob)."""

from __future__ import annotations

import base64
import shutil
import uuid

import httpx
import pytest

from keytrio.protocol import credential
from keytrio.protocol.versions import SERVER_VERSIONS
from tests.actors.envelope_support import envelope
from tests.actors.registrar_support import EkCa, SoftTpm, b64, registrar_config, running_registrar

A = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
B = "d432fbb3-d2f1-4a97-9ef7-75bd81c00001"
U = "d432fbb3-d2f1-4a97-9ef7-75bd81c0ffff"


@pytest.fixture(scope="module")
def softs() -> list[SoftTpm]:
    return [SoftTpm.new() for _ in range(2)]


def errors(r: httpx.Response, code: int) -> str:
    """The detail of a v3 JSON:API error document (exactly one error, status as a string)."""
    assert r.status_code == code, r.text
    doc = r.json()
    assert set(doc) == {"errors"}, doc
    (err,) = doc["errors"]
    assert err["status"] == str(code) and isinstance(err["title"], str) and err["title"]
    assert isinstance(err["detail"], str) and err["detail"]
    return err["detail"]


def v3_body(soft: SoftTpm, agent_id: object = A, **changes: object) -> dict:
    return {"agent_id": agent_id, **soft.body(**changes)}


async def register_v3(reg, body: object) -> httpx.Response:
    return await reg.agent.post("/v3.0/agents/", json=body)


async def activate_v3(reg, agent_id: str, tag: str) -> httpx.Response:
    return await reg.agent.post(f"/v3.0/agents/{agent_id}/activate", json={"auth_tag": tag})


async def enroll_v3(reg, agent_id: str, soft: SoftTpm, **changes: object) -> None:
    r = await register_v3(reg, v3_body(soft, agent_id, **changes))
    cred = soft.activate(envelope(r, 200)["results"]["blob"])
    envelope(await activate_v3(reg, agent_id, credential.activation_auth_tag(cred, agent_id)), 200)


# --- the full cycle on swtpm --------------------------------------------------------------------


@pytest.mark.swtpm
async def test_v3_register_activate_with_swtpm(tpm, swtpm, pki, tmp_path):
    from keytrio.testbed.swtpm_state import ek_ca_certs

    store_dir = tmp_path / "tpm_cert_store"
    store_dir.mkdir()
    for pem in ek_ca_certs(swtpm.state_dir):
        shutil.copy(pem, store_dir / pem.name)
    cfg = registrar_config(pki, tmp_path / "reg", require_ek_cert=True, tpm_cert_store=str(store_dir))
    ek = await tpm.endorsement_key(alg="rsa2048")
    ak = await tpm.create_ak(ek)
    agent_id = str(uuid.uuid4())
    # the v3.0 document's body: agent_id inside, port as a string
    body = {"agent_id": agent_id, "ek_tpm": b64(ek.public), "aik_tpm": b64(ak.public),
            "ekcert": b64(ek.cert_der), "mtls_cert": pki.agent.pem, "ip": "127.0.0.1", "port": "9002"}
    async with running_registrar(cfg, pki) as reg:
        for client in (reg.agent, reg.anonymous, reg.admin):  # the probe is public on both ports
            assert envelope(await client.get("/v3.0/"), 200)["results"] == {}
        versions = envelope(await reg.agent.get("/version"), 200)["results"]
        assert versions["supported_versions"][-1] == "3.0" and versions["current_version"] == "2.5"

        blob = envelope(await register_v3(reg, body), 200)["results"]["blob"]
        errors(await reg.admin.get(f"/v3.0/agents/{agent_id}"), 404)  # not before activation
        cred = await tpm.activate_credential(ak, ek, base64.b64decode(blob))
        envelope(await activate_v3(reg, agent_id, credential.activation_auth_tag(cred, agent_id)), 200)

        rec = envelope(await reg.admin.get(f"/v3.0/agents/{agent_id}"), 200)["results"]
        assert (rec["ip"], rec["port"], rec["regcount"], rec["mtls_cert"]) == ("127.0.0.1", 9002, 1, pki.agent.pem)
        assert rec["aik_tpm"] == b64(ak.public)
        assert envelope(await reg.admin.get(f"/v2.1/agents/{agent_id}"), 200)["results"] == rec
        assert agent_id in envelope(await reg.admin.get("/v3.0/agents/"), 200)["results"]["uuids"]

        # a replay of the public EK/AK through v3 changes nothing GET answers; a wrong tag drops it
        envelope(await register_v3(reg, {**body, "port": 9100, "mtls_cert": pki.other_agent.pem}), 200)
        assert envelope(await reg.admin.get(f"/v3.0/agents/{agent_id}"), 200)["results"] == rec
        errors(await activate_v3(reg, agent_id, credential.activation_auth_tag(b"w" * 32, agent_id)), 400)
        assert envelope(await reg.admin.get(f"/v3.0/agents/{agent_id}"), 200)["results"] == rec

        # the agent restarts and re-registers (push agent: no contact address): visible once activated
        push = {k: v for k, v in body.items() if k not in ("ip", "port", "mtls_cert")}
        blob = envelope(await register_v3(reg, push), 200)["results"]["blob"]
        cred = await tpm.activate_credential(ak, ek, base64.b64decode(blob))
        envelope(await activate_v3(reg, agent_id, credential.activation_auth_tag(cred, agent_id)), 200)
        rec = envelope(await reg.admin.get(f"/v3.0/agents/{agent_id}"), 200)["results"]
        assert (rec["ip"], rec["port"], rec["mtls_cert"], rec["regcount"]) == (None, None, None, 2)

        # another AK under the same id: 403, nothing changes
        before = await reg.rows()
        ak2 = await tpm.create_ak(ek)
        assert "different" in errors(await register_v3(reg, {**body, "aik_tpm": b64(ak2.public)}), 403)
        assert await reg.rows() == before

        envelope(await reg.admin.delete(f"/v3.0/agents/{agent_id}"), 200)
        errors(await reg.admin.get(f"/v3.0/agents/{agent_id}"), 404)


# --- v2.x is unchanged beside v3.0 ---------------------------------------------------------------


async def test_v2_unchanged_and_the_versions_meet(config, pki, softs):
    s = softs[0]
    async with running_registrar(config, pki) as reg:
        for client in (reg.agent, reg.anonymous):
            results = envelope(await client.get("/version"), 200)["results"]
            assert results == {"current_version": "2.5", "supported_versions": [*SERVER_VERSIONS, "3.0"]}
        assert envelope(await reg.agent.get("/v3.0"), 200)["results"] == {}
        # v2 errors keep the v2 envelope; the probe and the collection POST are v3-only
        envelope(await reg.agent.get("/v2.5/"), 404)
        envelope(await reg.agent.post("/v2.5/agents/", json=v3_body(s)), 404)
        assert "API version not supported" in envelope(await reg.agent.post(f"/v9.9/agents/{A}", json=s.body()), 400)["status"]

        # registered in v2, re-registered and activated in v3 (and back): one record
        await reg.enroll(A, s)
        await enroll_v3(reg, A, s, port=9010)
        rec = envelope(await reg.record(A), 200)["results"]
        assert (rec["port"], rec["regcount"]) == (9010, 2)
        await reg.enroll(A, s, port=9011)
        assert envelope(await reg.admin.get(f"/v3.0/agents/{A}"), 200)["results"]["regcount"] == 3

        # an upper-case UUID in the body: stored normalised, activated under the id as written
        await enroll_v3(reg, B.upper(), softs[1])
        assert envelope(await reg.record(B), 200)["results"]["aik_tpm"] == softs[1].aik_tpm


async def test_v3_requires_trusted_ek_cert(pki, tmp_path, softs):
    ca, foreign = EkCa.new(), EkCa.new("Foreign CA")
    store = tmp_path / "store"
    ca.write(store)
    cfg = registrar_config(pki, tmp_path / "reg", require_ek_cert=True, tpm_cert_store=str(store))
    s = softs[0]
    good = SoftTpm(s.ek_key, s.ak_key, ca.issue(s.ek_key.public_key()))
    bad = SoftTpm(s.ek_key, s.ak_key, foreign.issue(s.ek_key.public_key()))
    async with running_registrar(cfg, pki) as reg:
        assert "required" in errors(await register_v3(reg, v3_body(s)), 400)
        assert "trusted TPM CA" in errors(await register_v3(reg, v3_body(bad)), 403)
        assert await reg.rows() == []
        await enroll_v3(reg, A, good)


# --- hostile input: a JSON:API error, nothing stored, the server keeps serving -------------------

_BIG = "A" * (1 << 20)


def _case(kind: str, s: SoftTpm, other: SoftTpm) -> object:
    return {
        "malformed": b'{"agent_id": ',
        "array": b'[{"agent_id": "x"}]',
        "not_utf8": b"\xff\xfe{}",
        "duplicate_keys": b'{"agent_id": "a", "agent_id": "b"}',
        "deep": b"[" * 10000 + b"]" * 10000,
        "id_missing": s.body(),
        "id_int": v3_body(s, 12),
        "id_null": v3_body(s, None),
        "id_list": v3_body(s, [A]),
        "id_space": v3_body(s, "a b"),
        "id_long": v3_body(s, "x" * 81),
        "id_slash": v3_body(s, "a/b"),
        "id_empty": v3_body(s, ""),
        "ek_missing": {k: v for k, v in v3_body(s, U).items() if k != "ek_tpm"},
        "ek_int": v3_body(s, U, ek_tpm=12),
        "ek_bad_b64": v3_body(s, U, ek_tpm="@@not base64@@"),
        "ek_is_signing_key": v3_body(s, U, ek_tpm=s.aik_tpm),
        "aik_dict": v3_body(s, U, aik_tpm={"a": 1}),
        "port_text": v3_body(s, U, port="abc"),
        "port_zero_text": v3_body(s, U, port="0"),
        "port_big_text": v3_body(s, U, port="70000"),
        "port_float": v3_body(s, U, port=9002.5),
        "ip_bad": v3_body(s, U, ip="bad ip!"),
        "mtls_int": v3_body(s, U, mtls_cert=7),
        "identity_mismatch": v3_body(s, A, ek_tpm=other.ek_tpm),
        "identity_mismatch_pending": v3_body(s, B, ek_tpm=other.ek_tpm),
        "oversized": v3_body(s, U, mtls_cert=_BIG),
        "valid": v3_body(s, U),
        "tag_missing": {},
        "tag_int": {"auth_tag": 5},
        "tag_not_hex": {"auth_tag": "z" * 96},
        "tag_oversized": {"auth_tag": _BIG},
        "wrong_tag": {"auth_tag": credential.activation_auth_tag(b"w" * 32, A)},
        "none": None,
    }[kind]


# (name, port, method, path, body kind, code); {A} is active, {B} has a pending first registration
BAD_INPUT = [
    ("reg-malformed-json", "http", "POST", "/v3.0/agents/", "malformed", 400),
    ("reg-json-array", "http", "POST", "/v3.0/agents/", "array", 400),
    ("reg-not-utf8", "http", "POST", "/v3.0/agents/", "not_utf8", 400),
    ("reg-duplicate-keys", "http", "POST", "/v3.0/agents/", "duplicate_keys", 400),
    ("reg-too-deep", "http", "POST", "/v3.0/agents/", "deep", 400),
    ("reg-no-body", "http", "POST", "/v3.0/agents/", "none", 400),
    ("reg-id-missing", "http", "POST", "/v3.0/agents/", "id_missing", 400),
    ("reg-id-int", "http", "POST", "/v3.0/agents/", "id_int", 400),
    ("reg-id-null", "http", "POST", "/v3.0/agents/", "id_null", 400),
    ("reg-id-list", "http", "POST", "/v3.0/agents/", "id_list", 400),
    ("reg-id-space", "http", "POST", "/v3.0/agents/", "id_space", 400),
    ("reg-id-too-long", "http", "POST", "/v3.0/agents/", "id_long", 400),
    ("reg-id-slash", "http", "POST", "/v3.0/agents/", "id_slash", 400),
    ("reg-id-empty", "http", "POST", "/v3.0/agents/", "id_empty", 400),
    ("reg-ek-missing", "http", "POST", "/v3.0/agents/", "ek_missing", 400),
    ("reg-ek-wrong-type", "http", "POST", "/v3.0/agents/", "ek_int", 400),
    ("reg-ek-bad-base64", "http", "POST", "/v3.0/agents/", "ek_bad_b64", 400),
    ("reg-ek-is-signing-key", "http", "POST", "/v3.0/agents/", "ek_is_signing_key", 400),
    ("reg-aik-wrong-type", "http", "POST", "/v3.0/agents/", "aik_dict", 400),
    ("reg-port-text", "http", "POST", "/v3.0/agents/", "port_text", 400),
    ("reg-port-zero-text", "http", "POST", "/v3.0/agents/", "port_zero_text", 400),
    ("reg-port-big-text", "http", "POST", "/v3.0/agents/", "port_big_text", 400),
    ("reg-port-float", "http", "POST", "/v3.0/agents/", "port_float", 400),
    ("reg-ip-bad", "http", "POST", "/v3.0/agents/", "ip_bad", 400),
    ("reg-mtls-wrong-type", "http", "POST", "/v3.0/agents/", "mtls_int", 400),
    ("reg-identity-mismatch", "http", "POST", "/v3.0/agents/", "identity_mismatch", 403),
    ("reg-identity-mismatch-pending", "http", "POST", "/v3.0/agents/", "identity_mismatch_pending", 403),
    ("reg-oversized", "http", "POST", "/v3.0/agents/", "oversized", 413),
    ("reg-legacy-path", "http", "POST", "/v3.0/agents/{U}", "valid", 404),
    ("reg-bad-minor", "http", "POST", "/v3.9/agents/", "valid", 400),
    ("act-malformed-json", "http", "POST", "/v3.0/agents/{B}/activate", "malformed", 400),
    ("act-missing-tag", "http", "POST", "/v3.0/agents/{B}/activate", "tag_missing", 400),
    ("act-tag-wrong-type", "http", "POST", "/v3.0/agents/{B}/activate", "tag_int", 400),
    ("act-tag-not-hex", "http", "POST", "/v3.0/agents/{B}/activate", "tag_not_hex", 400),
    ("act-tag-oversized", "http", "POST", "/v3.0/agents/{B}/activate", "tag_oversized", 413),
    ("act-invalid-id", "http", "POST", "/v3.0/agents/a%20b/activate", "tag_not_hex", 400),
    ("act-unknown-agent", "http", "POST", "/v3.0/agents/{U}/activate", "wrong_tag", 404),
    ("act-wrong-tag-active", "http", "POST", "/v3.0/agents/{A}/activate", "wrong_tag", 400),
    ("act-put-gone", "http", "PUT", "/v3.0/agents/{B}/activate", "wrong_tag", 405),
    ("act-legacy-put", "http", "PUT", "/v3.0/agents/{B}", "wrong_tag", 404),
    ("admin-list-no-cert", "anon", "GET", "/v3.0/agents/", "none", 403),
    ("admin-get-no-cert", "anon", "GET", "/v3.0/agents/{A}", "none", 403),
    ("admin-delete-no-cert", "anon", "DELETE", "/v3.0/agents/{A}", "none", 403),
    ("admin-get-invalid-id", "admin", "GET", "/v3.0/agents/a%20b", "none", 400),
    ("admin-get-pending", "admin", "GET", "/v3.0/agents/{B}", "none", 404),
    ("admin-delete-unknown", "admin", "DELETE", "/v3.0/agents/{U}", "none", 404),
    ("admin-register-not-here", "admin", "POST", "/v3.0/agents/", "valid", 405),
]


@pytest.mark.parametrize(
    ("port", "method", "path", "kind", "code"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
async def test_v3_bad_input(config, pki, softs, port, method, path, kind, code):
    s, other = softs
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, s)
        envelope(await reg.register(B, s.body()), 200)
        before = await reg.rows()
        client = {"http": reg.agent, "admin": reg.admin, "anon": reg.anonymous}[port]
        body = _case(kind, s, other)
        url = path.format(A=A, B=B, U=U)
        if isinstance(body, bytes):
            r = await client.request(method, url, content=body, headers={"content-type": "application/json"})
        elif body is None:
            r = await client.request(method, url)
        else:
            r = await client.request(method, url, json=body)
        detail = errors(r, code)
        if code == 405:
            assert r.headers["allow"]
        if kind.startswith("id_"):
            assert "agent_id" in detail
        assert await reg.rows() == before
        assert envelope(await reg.agent.get("/v3.0/"), 200)  # still serving
        envelope(await reg.admin.get(f"/v3.0/agents/{A}"), 200)
