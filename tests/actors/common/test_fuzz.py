"""No input yields a 5xx: hypothesis-drawn hostile requests to every route of every actor.

Each actor runs for real on its sockets (registrar plain HTTP + mTLS, verifier mTLS with public
/verify/*, agent mTLS on swtpm); the routes come from the apps' url_map. Every answer must be
< 500 in the JSON envelope, the stored state (every SQLite table; the agent's files and keys)
must not change, and a good request must still work afterwards. tests/actors/fuzz_support.py
describes the requests; ``KEYTRIO_FUZZ_EXAMPLES=N`` is the long local mode.
"""

from __future__ import annotations

import base64
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from keytrio.actors.common import tls
from keytrio.actors.verifier import records
from keytrio.protocol import payload as pl
from keytrio.protocol import revocation
from tests.actors import fuzz_support as fz
from tests.actors.registrar_support import SoftTpm, registrar_config, running_registrar
from tests.actors.verifier_support import (
    BASE,
    doc_b64,
    enrol,
    enrol_body,
    new_halves,
    policy_doc,
    revocation_pair,
    start_test_agent,
    start_verifier,
)

A = "d432fbb3-d2f1-4a97-9ef7-75bd81c0f000"
NEW = "d432fbb3-d2f1-4a97-9ef7-75bd81c0f001"  # never registered/enrolled: seeds target it
NONCE = "abcdefghij0123456789"
MB_GOOD = (Path(__file__).parents[2] / "protocol" / "data" / "mb_refstate_upstream_good.json").read_text()


def _report(f: fz.Fuzzer, routes: list[tuple[str, tuple[str, ...]]]) -> None:
    assert {r for r, _ in routes} <= set(f.rules), f"routes never fuzzed: {set(dict(routes)) - set(f.rules)}"
    line = f.report()
    print(line)
    out = os.environ.get("KEYTRIO_FUZZ_REPORT")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


async def test_fuzz_registrar(pki: Any, tmp_path: Path) -> None:
    config = registrar_config(pki, tmp_path / "registrar")
    db = tmp_path / "registrar" / "registrar.sqlite"
    soft, fresh = SoftTpm.new(), SoftTpm.new()
    async with running_registrar(config, pki) as reg:
        await reg.enroll(A, soft)
        apps = reg.registrar.apps
        assert set(apps) == {"agent", "admin"}
        admin_ctx = tls.client_context([pki.ca], pki.client.cert, pki.client.key)
        anon_ctx = tls.client_context([pki.ca])
        plain_routes, admin_routes = fz.routes_of(apps["agent"]), fz.routes_of(apps["admin"])
        assert any("activate" in r for r, _ in plain_routes) and any(m == ("DELETE",) for _, m in admin_routes)
        register = "/v<apiversion:api_version>/agents/<agent_id>"
        seeds = [
            fz.Seed("POST", register, fresh.body(), numeric=frozenset({"port"})),
            fz.Seed("PUT", "/v<apiversion:api_version>/agents/<agent_id>/activate", {"auth_tag": "ab" * 32}),
            fz.Seed("POST", "/v<apiversion:api_version>/agents/<agent_id>/activate", {"auth_tag": "ab" * 32}),
            fz.Seed("PUT", register, {"auth_tag": "ab" * 32}),
        ]
        known = {"agent_id": [A]}
        n = fz.examples(200)
        for name, address, ctx, anon, routes in (
            ("registrar (plain)", reg.addresses.http, None, None, plain_routes),
            ("registrar (mTLS)", reg.addresses.https, admin_ctx, anon_ctx, admin_routes),
        ):
            fuzzer = fz.Fuzzer(name, address[0], address[1], ctx, lambda: fz.sqlite_dump(db), anon_ctx=anon)
            await trio.to_thread.run_sync(partial(fuzzer.run_routes, routes, n, known=known, seeds=seeds,
                                                  cert_optional=anon is not None))
            _report(fuzzer, routes)
            assert fuzzer.sent >= n

        # still serving: the record is there and a new agent registers and activates
        r = await reg.record(A)
        assert r.status_code == 200 and r.json()["results"]["aik_tpm"] == soft.aik_tpm
        await reg.enroll(NEW, fresh)


@pytest.mark.swtpm
async def test_fuzz_verifier(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, None)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    db = tmp_path / "verifier" / "verifier.sqlite"
    await rv.call("POST", "/allowlists/base", {"runtime_policy": doc_b64(policy_doc(BASE))})
    await rv.call("POST", "/mbpolicies/good", {"mb_policy": MB_GOOD}, code=201)
    await enrol(rv, a.agent_id, enrol_body(a, v=new_halves().v))
    await rv.wait_count(a.agent_id, 1)
    await rv.call("PUT", f"/agents/{a.agent_id}/stop")  # the monitor stops: the tables hold still
    await rv.wait_state(a.agent_id, records.TENANT_FAILED)

    q = (await a.run.get("/quotes/integrity", nonce=NONCE, mask="0x10400", partial="0",
                         ima_ml_entry="0")).json()["results"]
    evidence = {"type": "tpm", "data": {
        "nonce": NONCE, "quote": q["quote"], "hash_alg": q["hash_alg"],
        "tpm_ak": base64.b64encode(a.run.info.ak_public).decode(), "tpm_ek": "",
        "tpm_policy": json.dumps({"mask": "0x400"}), "runtime_policy": json.dumps(policy_doc(BASE)),
        "mb_policy": "", "ima_measurement_list": q["ima_measurement_list"], "mb_log": "",
    }}  # fmt: skip
    agents = "/v<apiversion:api_version>/agents/<agent_id>"
    body = enrol_body(a, v=new_halves().v)
    seeds = [
        fz.Seed("POST", agents, body, numeric=frozenset({"cloudagent_port"})),
        fz.Seed("POST", "/v<apiversion:api_version>/allowlists/<name>", {"runtime_policy": doc_b64(policy_doc(BASE)),
                "runtime_policy_key": "", "tpm_policy": json.dumps({"mask": "0x400"})}),
        fz.Seed("PUT", "/v<apiversion:api_version>/allowlists/<name>", {"runtime_policy": doc_b64(policy_doc(BASE))}),
        fz.Seed("POST", "/v<apiversion:api_version>/mbpolicies/<name>", {"mb_policy": MB_GOOD}),
        fz.Seed("PUT", "/v<apiversion:api_version>/mbpolicies/<name>", {"mb_policy": MB_GOOD}),
        fz.Seed("POST", "/v<apiversion:api_version>/verify/evidence", evidence),
    ]
    assert rv.verifier.app is not None
    routes = fz.routes_of(rv.verifier.app)
    assert {"/v<apiversion:api_version>/verify/evidence", "/v<apiversion:api_version>/verify/identity",
            "/v<apiversion:api_version>/allowlists/<name>", "/v<apiversion:api_version>/mbpolicies/<name>"} <= {
        r for r, _ in routes}
    host, port = rv.url.split("//")[1].split("/")[0].split(":")
    admin_ctx = tls.client_context([pki.ca], pki.client.cert, pki.client.key)
    fuzzer = fz.Fuzzer("verifier (mTLS)", host, int(port), admin_ctx, lambda: fz.sqlite_dump(db),
                       anon_ctx=tls.client_context([pki.ca]))
    known = {"agent_id": [a.agent_id], "name": ["base", "good"]}
    await trio.to_thread.run_sync(partial(fuzzer.run_routes, routes, fz.examples(400), known=known, seeds=seeds,
                                          cert_optional=True))
    _report(fuzzer, routes)

    # still serving: the record, the policies, and a real evidence verdict
    assert (await rv.get(a.agent_id))["operational_state"] == records.TENANT_FAILED
    await rv.call("GET", "/allowlists/base")
    await rv.call("GET", "/mbpolicies/good")
    res = (await rv.call("POST", "/verify/evidence", evidence))["results"]
    assert res["failures"] == [] and res["valid"] == 1


@pytest.mark.swtpm
async def test_fuzz_agent(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    pair = revocation_pair(tmp_path / "rev")
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair)
    r = a.run
    nk = r.info.nk_pem
    assert r.agent.app is not None
    routes = fz.routes_of(r.agent.app)
    assert {"/v<apiversion:api_version>/keys/ukey", "/v<apiversion:api_version>/notifications/revocation",
            "/v<apiversion:api_version>/quotes/integrity"} <= {x for x, _ in routes}
    h = new_halves()
    key = serialization.load_pem_private_key(pair.key_pem.encode(), None)
    msg = revocation.build_message(agent_id=r.info.agent_id, ip="127.0.0.1", port=1, tpm_policy="{}",
                                   meta_data="{}", event_time="now", event_id="x", context="fuzz")
    seeds = [
        fz.Seed("POST", "/v<apiversion:api_version>/keys/ukey",
                {"encrypted_key": pl.encrypt_key_half(nk, h.u), "auth_tag": pl.auth_tag(h.k, r.info.agent_id)}),
        fz.Seed("POST", "/v<apiversion:api_version>/keys/vkey", {"encrypted_key": pl.encrypt_key_half(nk, h.v)}),
        fz.Seed("POST", "/v<apiversion:api_version>/notifications/revocation",
                {"msg": msg, "signature": revocation.sign_message(key, msg)}),  # type: ignore[arg-type]
    ]
    host, port = r.root.split("//")[1].split(":")
    ctx = tls.client_context([pki.ca], pki.client.cert, pki.client.key, pinned_server_cert_pem=r.info.mtls_cert)

    def snapshot() -> Any:
        return fz.file_tree(r.data_dir), fz.file_tree(a.notices_dir)

    async def no_key_no_action() -> None:
        assert (await r.get("/keys/verify", challenge="abc")).status_code == 400
        assert r.agent.runner is not None and r.agent.runner.completed == 0

    fuzzer = fz.Fuzzer("agent (mTLS)", host, int(port), ctx, snapshot, extra_check=no_key_no_action)
    await trio.to_thread.run_sync(partial(fuzzer.run_routes, routes, fz.examples(200), known={}, seeds=seeds))
    _report(fuzzer, routes)

    # still serving: a full key delivery, a quote, and a verified notice
    hv = new_halves()
    assert (await r.post("/keys/vkey", {"encrypted_key": pl.encrypt_key_half(nk, hv.v)})).status_code == 200
    assert (await r.post("/keys/ukey", {"encrypted_key": pl.encrypt_key_half(nk, hv.u),
                                        "auth_tag": pl.auth_tag(hv.k, r.info.agent_id)})).status_code == 200
    with trio.fail_after(30):
        while (resp := await r.get("/keys/verify", challenge="abc")).status_code != 200:
            await trio.sleep(0.05)
    assert resp.json()["results"]["hmac"] == pl.verify_hmac(hv.k, "abc")
    assert (await r.get("/quotes/identity", nonce=NONCE)).status_code == 200
