"""The verifier's REST API and store over real mTLS sockets and SQLite (no monitor: hooks record calls)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio

from keytrio.actors.common.serve import serve
from keytrio.actors.common.store import Store, sqlite_url
from keytrio.actors.common.tls import client_context, server_context
from keytrio.actors.verifier import records
from keytrio.actors.verifier.app import build_app
from keytrio.actors.verifier.enrolment import REQUIRED_FIELDS
from keytrio.actors.verifier.schema import agents, metadata
from tests.actors.envelope_support import envelope
from tests.actors.registrar_support import AK_ATTRS, BAD_IDS, GOOD_IDS, SoftTpm, ak_public, b64
from tests.actors.verifier_support import PCR15_POLICY, soft_enrol_body

A = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
B = "d432fbb3-d2f1-4a97-9ef7-75bd81c00001"
U = "d432fbb3-d2f1-4a97-9ef7-75bd81c0ffff"


@pytest.fixture(scope="module")
def soft() -> SoftTpm:
    return SoftTpm.new()


@dataclass
class Running:
    store: Store
    admin: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    port: int
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def rows(self) -> list[tuple]:
        def q(conn: sa.Connection) -> list[tuple]:
            return [tuple(r) for r in conn.execute(sa.select(agents).order_by(agents.c.agent_id))]

        return await self.store.read(q)


@contextlib.asynccontextmanager
async def running(
    pki: Any, db: Any, *, max_upload_size: int = 1 << 20, max_policy_size: int = 1 << 20
) -> AsyncIterator[Running]:
    store = await Store.open(sqlite_url(db), metadata)
    calls: list[tuple[str, str]] = []

    def sync_hook(name: str) -> Any:
        return lambda aid: calls.append((name, aid))

    async def enrolled(aid: str) -> None:
        await trio.lowlevel.checkpoint()
        calls.append(("enrolled", aid))

    try:
        async with trio.open_nursery() as nursery:
            def make(port: int) -> Any:
                return build_app(
                    store,
                    verifier_id="default",
                    ip="127.0.0.1",
                    port=port,
                    trusted_client_ca=[pki.ca],
                    max_upload_size=max_upload_size,
                    max_policy_size=max_policy_size,
                    on_enrolled=enrolled,
                    on_deleted=sync_hook("deleted"),
                    on_stop=sync_hook("stop"),
                    on_reactivate=sync_hook("reactivate"),
                )

            app_ = make(8881)
            ctx = server_context(pki.server.cert, pki.server.key, client_ca_files=[pki.ca], mode="optional")
            host, port = await nursery.start(
                lambda task_status: serve(app_, ssl_context=ctx, task_status=task_status)
            )
            url = f"https://{host}:{port}"
            admin_ctx = client_context([pki.ca], pki.client.cert, pki.client.key)
            anon_ctx = client_context([pki.ca])
            async with (
                httpx.AsyncClient(base_url=url, verify=admin_ctx, timeout=10) as admin,
                httpx.AsyncClient(base_url=url, verify=anon_ctx, timeout=10) as anonymous,
            ):
                yield Running(store, admin, anonymous, port, calls)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_enrol_get_list_stop_reactivate_delete(pki, tmp_path, soft):
    async with running(pki, tmp_path / "v.sqlite") as v:
        envelope(await v.admin.post(f"/v2.1/agents/{A}", json=soft_enrol_body(soft, pki)), 200)
        envelope(
            await v.admin.post(f"/v2.5/agents/{B.upper()}", json=soft_enrol_body(soft, pki, metadata={"x": 1})),
            200,
        )
        assert v.calls == [("enrolled", A), ("enrolled", B)]
        # the same id again: 409, nothing changed, no hook
        before = await v.rows()
        envelope(await v.admin.post(f"/v2.1/agents/{A}", json=soft_enrol_body(soft, pki, cloudagent_port=1)), 409)
        assert await v.rows() == before and len(v.calls) == 2

        rec = envelope(await v.admin.get(f"/v2.1/agents/{A}"), 200)["results"]
        assert rec["operational_state"] == records.GET_QUOTE
        assert (rec["ip"], rec["port"], rec["tpm_policy"], rec["meta_data"]) == (
            "127.0.0.1",
            9002,
            PCR15_POLICY,
            "{}",
        )
        assert rec["v"] == b64(bytes(range(32)))
        # no payload: upstream's tenant sends v null (no V is delivered then); "" is the same
        for aid, v_value in (("d432fbb3-d2f1-4a97-9ef7-75bd81c0f0f0", None),
                             ("d432fbb3-d2f1-4a97-9ef7-75bd81c0f0f1", "")):
            envelope(await v.admin.post(f"/v2.1/agents/{aid}", json=soft_enrol_body(soft, pki, v=v_value)), 200)
            assert envelope(await v.admin.get(f"/v2.1/agents/{aid}"), 200)["results"]["v"] is None
            envelope(await v.admin.delete(f"/v2.1/agents/{aid}"), 200)
        assert (rec["has_mb_refstate"], rec["has_runtime_policy"]) == (0, 0)
        assert rec["accept_tpm_encryption_algs"] == ["ecc", "rsa"]
        assert rec["accept_tpm_hash_algs"] == ["sha512", "sha384", "sha256"]
        assert (rec["enc_alg"], rec["sign_alg"], rec["hash_alg"]) == ("ecc", "ecdsa", "")
        assert (rec["verifier_id"], rec["verifier_ip"], rec["verifier_port"]) == (
            "default",
            "127.0.0.1",
            8881,
        )
        assert (rec["severity_level"], rec["last_event_id"]) == (None, None)
        assert (rec["attestation_count"], rec["last_received_quote"], rec["last_successful_attestation"]) == (
            0,
            0,
            0,
        )
        assert "attestation_status" not in rec
        rec25 = envelope(await v.admin.get(f"/v2.5/agents/{A}"), 200)["results"]
        # upstream reports enc_alg as the agent gave it (no key size) and the push-mode timeout
        assert (rec25["attestation_status"], rec25["attestation_period"], rec25["enc_alg"],
                rec25["maximum_attestation_interval"]) == ("PENDING", "2s", "ecc", "10s")
        assert json.loads(envelope(await v.admin.get(f"/v2.1/agents/{B}"), 200)["results"]["meta_data"]) == {
            "x": 1
        }

        # the monitor's writes show up in GET
        assert await records.record_success(
            v.store, A, now=1700000000.7, hash_alg="sha256", next_ima_ml_entry=5
        )
        assert await records.record_failure(
            v.store,
            A,
            state=records.INVALID_QUOTE,
            event_id="pcr_validation.invalid_pcr_15",
            severity_level=4,
        )
        assert await records.record_failure(
            v.store, A, state=records.INVALID_QUOTE, event_id="minor", severity_level=1
        )
        rec25 = envelope(await v.admin.get(f"/v2.5/agents/{A}"), 200)["results"]
        assert (rec25["attestation_count"], rec25["last_successful_attestation"], rec25["hash_alg"]) == (
            1,
            1700000000,
            "sha256",
        )
        assert (rec25["severity_level"], rec25["last_event_id"]) == (4, "pcr_validation.invalid_pcr_15")
        assert (rec25["operational_state"], rec25["attestation_status"]) == (9, "FAIL")
        assert (await records.get(v.store, A))["next_ima_ml_entry"] == 5
        assert not await records.record_success(v.store, U, now=1.0)

        lst = envelope(await v.admin.get("/v2.1/agents/?verifier=default"), 200)["results"]
        assert lst == {"uuids": [[A], [B]]}
        assert envelope(await v.admin.get("/v2.1/agents/"), 200)["results"] == {"uuids": [[A], [B]]}
        assert envelope(await v.admin.get("/v2.1/agents/?verifier=other"), 200)["results"] == {"uuids": []}
        bulk = envelope(await v.admin.get("/v2.1/agents/?bulk=1&verifier=default"), 200)["results"]
        assert set(bulk) == {A, B} and bulk[A]["operational_state"] == 9

        envelope(await v.admin.put(f"/v2.1/agents/{A}/stop"), 200)
        assert envelope(await v.admin.get(f"/v2.1/agents/{A}"), 200)["results"]["operational_state"] == 10
        envelope(await v.admin.put(f"/v2.1/agents/{A}/reactivate"), 200)
        assert envelope(await v.admin.get(f"/v2.1/agents/{A}"), 200)["results"]["operational_state"] == 3
        envelope(await v.admin.delete(f"/v2.1/agents/{A}"), 200)
        envelope(await v.admin.get(f"/v2.1/agents/{A}"), 404)
        envelope(await v.admin.delete(f"/v2.1/agents/{A}"), 404)
        envelope(await v.admin.put(f"/v2.1/agents/{A}/stop"), 404)
        envelope(await v.admin.put(f"/v2.1/agents/{A}/reactivate"), 404)
        assert v.calls[6:] == [("stop", A), ("reactivate", A), ("deleted", A)]  # after the two v-less agents
        # re-add after delete
        envelope(await v.admin.post(f"/v2.1/agents/{A}", json=soft_enrol_body(soft, pki)), 200)
        assert envelope(await v.admin.get("/v2.1/agents/"), 200)["results"] == {"uuids": [[A], [B]]}

        # /version is public, the rest is not
        results = envelope(await v.anonymous.get("/version"), 200)["results"]
        assert results["current_version"] == "2.5"


async def test_persistence_across_reopening_the_store(pki, tmp_path, soft):
    db = tmp_path / "v.sqlite"
    async with running(pki, db) as v:
        envelope(await v.admin.post(f"/v2.1/agents/{A}", json=soft_enrol_body(soft, pki)), 200)
        await records.record_success(
            v.store, A, now=42.0, ima_pcr10={"sha256": "ab" * 32}, clock_info={"clock": 5}
        )
        rows = await v.rows()
        first = envelope(await v.admin.get(f"/v2.1/agents/{A}"), 200)["results"]
    async with running(pki, db) as v:
        assert await v.rows() == rows
        assert envelope(await v.admin.get(f"/v2.1/agents/{A}"), 200)["results"] == first
        row = await records.get(v.store, A)
        assert json.loads(row["ima_pcr10"]) == {"sha256": "ab" * 32}
        assert json.loads(row["tpm_clock_info"]) == {"clock": 5}


# --- bad input: every class, envelope + unchanged store + still serving --------------------------------


def _bad_body(kind: str, soft: SoftTpm, pki: Any) -> object:
    if kind.startswith("missing:"):
        doc = soft_enrol_body(soft, pki)
        del doc[kind.split(":", 1)[1]]
        return doc
    wrong_ak = ak_public(soft.ak_key, AK_ATTRS & ~0x00010000)  # without RESTRICTED
    cases: dict[str, object] = {
        "v_not_b64": soft_enrol_body(soft, pki, v="not base64!"),
        "v_short": soft_enrol_body(soft, pki, v=b64(b"x" * 16)),
        "port_text": soft_enrol_body(soft, pki, cloudagent_port="http"),
        "port_range": soft_enrol_body(soft, pki, cloudagent_port=70000),
        "port_bool": soft_enrol_body(soft, pki, cloudagent_port=True),
        "ip_bad": soft_enrol_body(soft, pki, cloudagent_ip="no spaces allowed"),
        "ip_type": soft_enrol_body(soft, pki, cloudagent_ip=["127.0.0.1"]),
        "policy_not_json": soft_enrol_body(soft, pki, tpm_policy="{nope"),
        "policy_no_mask": soft_enrol_body(soft, pki, tpm_policy=json.dumps({"15": ["00"]})),
        "policy_bad_mask": soft_enrol_body(soft, pki, tpm_policy=json.dumps({"mask": "0x1000000"})),
        "policy_bad_pcr": soft_enrol_body(soft, pki, tpm_policy=json.dumps({"mask": "0x1", "24": ["00"]})),
        "policy_bad_hex": soft_enrol_body(soft, pki, tpm_policy=json.dumps({"mask": "0x1", "0": ["xyz"]})),
        "policy_list": soft_enrol_body(soft, pki, tpm_policy="[]"),
        "algs_not_list": soft_enrol_body(soft, pki, accept_tpm_hash_algs="sha256"),
        "algs_not_strings": soft_enrol_body(soft, pki, accept_tpm_signing_algs=[1, 2]),
        "algs_bad_json": soft_enrol_body(soft, pki, accept_tpm_encryption_algs="[rsa"),
        "ak_not_b64": soft_enrol_body(soft, pki, ak_tpm="%%%"),
        "ak_garbage": soft_enrol_body(soft, pki, ak_tpm=b64(b"\x00\x05hello")),
        "ak_not_restricted": soft_enrol_body(soft, pki, ak_tpm=b64(wrong_ak.marshal())),
        "ak_is_ek": soft_enrol_body(soft, pki, ak_tpm=soft.ek_tpm),
        "mtls_not_pem": soft_enrol_body(soft, pki, mtls_cert="hello"),
        "mtls_wrong_label": soft_enrol_body(soft, pki, mtls_cert=pki.agent.key.read_text()),
        "metadata_not_object": soft_enrol_body(soft, pki, metadata="[1]"),
        "runtime_policy_not_b64": soft_enrol_body(soft, pki, runtime_policy="@@"),
        "runtime_policy_name_type": soft_enrol_body(soft, pki, runtime_policy_name=5),
        "supported_version_bad": soft_enrol_body(soft, pki, supported_version="v2.1"),
        "revocation_key_not_pem": soft_enrol_body(soft, pki, revocation_key="secret"),
        "malformed_json": b'{"v": ',
        "json_array": b"[]",
        "oversized": b'{"v": "' + b"A" * (1 << 20) + b'"}',
        "none": None,
    }
    return cases[kind]


BAD_INPUT = [
    *[(f"missing-{f}", "admin", "POST", "/v2.1/agents/{B}", f"missing:{f}", 400) for f in REQUIRED_FIELDS],
    *[
        (k.replace("_", "-"), "admin", "POST", "/v2.1/agents/{B}", k, c)
        for k, c in [
            ("v_not_b64", 400),
            ("v_short", 400),
            ("port_text", 400),
            ("port_range", 400),
            ("port_bool", 400),
            ("ip_bad", 400),
            ("ip_type", 400),
            ("policy_not_json", 400),
            ("policy_no_mask", 400),
            ("policy_bad_mask", 400),
            ("policy_bad_pcr", 400),
            ("policy_bad_hex", 400),
            ("policy_list", 400),
            ("algs_not_list", 400),
            ("algs_not_strings", 400),
            ("algs_bad_json", 400),
            ("ak_not_b64", 400),
            ("ak_garbage", 400),
            ("ak_not_restricted", 400),
            ("ak_is_ek", 400),
            ("mtls_not_pem", 400),
            ("mtls_wrong_label", 400),
            ("metadata_not_object", 400),
            ("runtime_policy_not_b64", 400),
            ("runtime_policy_name_type", 400),
            ("supported_version_bad", 400),
            ("revocation_key_not_pem", 400),
            ("malformed_json", 400),
            ("json_array", 400),
            ("oversized", 413),
        ]
    ],
    ("bad-uuid-post", "admin", "POST", "/v2.1/agents/{X}", "missing:v", 400),
    ("bad-uuid-get", "admin", "GET", "/v2.1/agents/{X}", "none", 400),
    ("bad-uuid-delete", "admin", "DELETE", "/v2.1/agents/{X}", "none", 400),
    ("unknown-get", "admin", "GET", "/v2.1/agents/{U}", "none", 404),
    ("unknown-delete", "admin", "DELETE", "/v2.1/agents/{U}", "none", 404),
    ("duplicate", "admin", "POST", "/v2.1/agents/{A}", "ok", 409),
    ("bad-version", "admin", "GET", "/v2.9/agents/", "none", 400),
    ("stop-wrong-method", "admin", "GET", "/v2.1/agents/{A}/stop", "none", 405),
    ("no-cert-post", "anon", "POST", "/v2.1/agents/{B}", "ok", 403),
    ("no-cert-get", "anon", "GET", "/v2.1/agents/{A}", "none", 403),
    ("no-cert-list", "anon", "GET", "/v2.1/agents/", "none", 403),
    ("no-cert-delete", "anon", "DELETE", "/v2.1/agents/{A}", "none", 403),
    ("no-cert-stop", "anon", "PUT", "/v2.1/agents/{A}/stop", "none", 403),
]


@pytest.mark.parametrize(
    ("client_name", "method", "path", "kind", "code"),
    [c[1:] for c in BAD_INPUT],
    ids=[c[0] for c in BAD_INPUT],
)
async def test_bad_input(pki, tmp_path, soft, client_name, method, path, kind, code):
    async with running(pki, tmp_path / "v.sqlite") as v:
        envelope(await v.admin.post(f"/v2.1/agents/{A}", json=soft_enrol_body(soft, pki)), 200)
        before, calls = await v.rows(), list(v.calls)
        client = v.admin if client_name == "admin" else v.anonymous
        url = path.format(A=A, B=B, U=U, X="not an id")
        body = soft_enrol_body(soft, pki) if kind == "ok" else _bad_body(kind, soft, pki)
        if isinstance(body, bytes):
            r = await client.request(method, url, content=body, headers={"content-type": "application/json"})
        elif body is None:
            r = await client.request(method, url)
        else:
            r = await client.request(method, url, json=body)
        status = envelope(r, code)["status"]
        if kind.startswith("missing:") and "{X}" not in path:
            assert kind.split(":", 1)[1] in status
        if "{X}" in path:
            assert "agent_id" in status
        if code == 413:  # enrolment may carry an inline runtime policy: the policy limit
            assert "max_policy_size" in status
        assert await v.rows() == before
        assert v.calls == calls
        envelope(await v.admin.get(f"/v2.1/agents/{A}"), 200)  # still serving


async def test_agent_ids_follow_upstreams_rule(pki, tmp_path, soft):
    async with running(pki, tmp_path / "v.sqlite") as v:
        for aid in GOOD_IDS:
            envelope(await v.admin.post(f"/v2.1/agents/{aid}", json=soft_enrol_body(soft, pki)), 200)
            assert envelope(await v.admin.get(f"/v2.5/agents/{aid}"), 200)["results"]["operational_state"] == 3
            envelope(await v.admin.put(f"/v2.1/agents/{aid}/stop"), 200)
            envelope(await v.admin.put(f"/v2.1/agents/{aid}/reactivate"), 200)
        listed = envelope(await v.admin.get("/v2.1/agents/?verifier=default"), 200)["results"]["uuids"]
        assert sorted(u for [u] in listed) == sorted(GOOD_IDS)
        envelope(await v.admin.get("/v2.1/agents/FOO"), 404)  # case-sensitive, as upstream
        before, calls = await v.rows(), list(v.calls)
        for aid in BAD_IDS:
            for method, path in (("POST", f"/v2.1/agents/{aid}"), ("GET", f"/v2.1/agents/{aid}"),
                                 ("DELETE", f"/v2.1/agents/{aid}"), ("PUT", f"/v2.1/agents/{aid}/stop"),
                                 ("PUT", f"/v2.1/agents/{aid}/reactivate")):
                body = soft_enrol_body(soft, pki) if method == "POST" else None
                status = envelope(await v.admin.request(method, path, json=body), 400)["status"]
                assert "agent_id" in status, (aid, method, status)
        assert await v.rows() == before and v.calls == calls
        for aid in GOOD_IDS:
            envelope(await v.admin.delete(f"/v2.1/agents/{aid}"), 200)


async def test_missing_fields_are_all_named(pki, tmp_path, soft):
    async with running(pki, tmp_path / "v.sqlite") as v:
        status = envelope(await v.admin.post(f"/v2.1/agents/{A}", json={"v": b64(bytes(32))}), 400)["status"]
        for f in REQUIRED_FIELDS[1:]:
            assert f in status
        assert await v.rows() == []
