"""The fleet benchmark's simulated agents (bench.sim_agent) against keytrio's real registrar and verifier.

Real sockets (HTTP to the registrar, mTLS both ways with the verifier), real SQLite, real RSA-2048
keys in software: the agents register (software ActivateCredential), are enrolled with a named
runtime policy, and must be attested again and again; an agent whose served IMA log has one
forged line must fail. The hang guard is a guard only; nothing here is timed.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio

from bench import fleet, sim_agent, sim_keys
from keytrio.actors.common import tls
from keytrio.protocol import credential, states
from keytrio.testbed.pki import make_cv_ca
from tests.bench_actors import start_registrar, start_verifier
from tests.pg import pg_admin_url  # noqa: F401

GUARD = 60.0  # seconds: a hang guard, never what the test asserts
POLICY_FILES = 40
REPO = Path(__file__).resolve().parents[1]


async def _record(client: httpx.AsyncClient, url: str, agent_id: str) -> dict[str, Any]:
    r = await client.get(f"{url}/v2.1/agents/{agent_id}")
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_activate_credential_in_software_is_makecredentials_inverse() -> None:
    pool = sim_keys.PrimePool(2)
    ek, ak, other = pool.key(0), pool.key(1), pool.key(2)
    ak_name = sim_keys.object_name(sim_keys.ak_public(ak))
    cred = credential.new_credential(bytes(range(32)))
    blob = credential.make_credential_blob(sim_keys.ek_public(ek).marshal(), ak_name, cred)
    assert sim_keys.activate_credential(ek, ak_name, blob) == cred
    # another EK cannot open it; another AK name fails the integrity HMAC
    with pytest.raises(ValueError):
        sim_keys.activate_credential(other, ak_name, blob)
    other_name = sim_keys.object_name(sim_keys.ak_public(other))
    with pytest.raises(sim_keys.ActivationError):
        sim_keys.activate_credential(ek, other_name, blob)


async def test_simulated_agents_register_and_attest_and_a_forged_log_fails(tmp_path: Path) -> None:
    ca = make_cv_ca(tmp_path / "cv_ca").dir
    pool = await trio.to_thread.run_sync(sim_keys.PrimePool, 2)  # 6 keys: three agents
    sims = sim_agent.SimAgents(ca / "cacert.crt", pool, POLICY_FILES, tmp_path / "sim")
    good, forged = sims.grow(2, tamper=frozenset({1}))
    ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
    async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=ctx, timeout=20.0) as client:
        port = await nursery.start(sims.serve)
        registrar = await start_registrar(nursery, ca, tmp_path / "registrar")
        assert await sims.register([good, forged], registrar) == 2
        # the registrar holds them as activated, with the AK the agent will sign with
        async with httpx.AsyncClient() as plain:
            for a in (good, forged):
                r = await plain.put(f"{registrar}/v2.1/agents/{a.agent_id}/activate", json={"auth_tag": "00" * 48})
                assert r.status_code == 400, r.text  # a wrong tag is refused; the right one was accepted above

        url = await start_verifier(nursery, ca, tmp_path / "verifier", quote_interval=0.2, retry_interval=0.1,
                                   max_retries=2, exponential_backoff=False)
        body = fleet.policy_body(POLICY_FILES, {good.entries[0].digest.hex()})
        r = await client.post(f"{url}/v2.1/allowlists/{fleet.POLICY_NAME}", json=body)
        assert r.status_code in (200, 201), r.text
        for a in (good, forged):
            enrol = fleet.enrolment(a.describe(port, sims.mtls_cert))
            assert base64.b64decode(enrol["ak_tpm"]) == a.ak_public.marshal()
            r = await client.post(f"{url}/v2.1/agents/{a.agent_id}", json=enrol)
            assert r.status_code == 200, r.text

        with trio.fail_after(GUARD):
            while True:
                ok, bad = await _record(client, url, good.agent_id), await _record(client, url, forged.agent_id)
                if ok["attestation_count"] >= 3 and bad["operational_state"] in states.FINAL:
                    break
                await trio.sleep(0.1)
        assert ok["operational_state"] == states.GET_QUOTE, ok
        assert bad["operational_state"] == states.INVALID_QUOTE, bad
        assert bad["attestation_count"] == 0, bad
        assert bad["last_event_id"].startswith("ima."), bad  # the forged line, not the quote
        assert sims.served >= 4  # every attestation was a quote this process signed
        nursery.cancel_scope.cancel()


def test_sim_fleet_agent_procs_and_workers_rows(tmp_path: Path, pg_admin_url: str) -> None:  # noqa: F811
    """``bench.sim_fleet --agent-procs 2 --workers 1,2`` at a tiny size, as ``./scripts/bench --sim`` runs it:
    two agents processes each serve their share of the fleet, and there is one keytrio row per worker
    count, the 2-worker one measured over the supervisor and both workers on a fresh PostgreSQL database
    (dropped afterwards)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.sim_fleet", "--out", str(out), "--sizes", "6", "--seconds", "2",
           "--quote-interval", "1", "--register", "2", "--policy-files", str(POLICY_FILES), "--agent-procs", "2",
           "--workers", "1,2", "--pg-url", pg_admin_url, "--enrol-concurrency", "4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=GUARD * 5)  # a hang guard only
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    report = json.loads((out / "sim_fleet.json").read_text())
    assert report["agent_procs"] == 2 and report["stopped"] == {}
    (row,) = report["rows"]
    served = row["served_per_agents_process"]
    assert len(served) == 2 and all(s > 0 for s in served), served  # both processes signed quotes
    one, two = row["keytrio 1 worker (SQLite)"], row["keytrio 2 workers (PostgreSQL)"]
    for r in (one, two):
        assert r["n"] == 6 and r["states"] == {str(states.GET_QUOTE): 6}, r  # six distinct agents, all attested
        assert r["polls"] > 0 and r["cpu_per_poll"] is not None, r
        # polls counted as the quotes the agents served in the CPU's window; the committed count of
        # the bulk GETs around it is the check (the two windows' ends differ by the commit lag)
        assert r["polls_counted_by"] == "served" and r["achieved_rate"] == r["polls"] / r["window_s"], r
        assert r["polls_committed"] > 0 and abs(r["polls"] - r["polls_committed"]) <= 2 * r["n"], r
    assert one["processes"] == 1 and one["database"] == "sqlite" and one["side_cpu_s"] == 0
    assert two["processes"] == 3 and two["workers"] == 2 and two["database"] == "postgresql"  # supervisor + 2
    assert "keytrio 2 workers (PostgreSQL): 3 processes" in done.stdout
    admin = sa.create_engine(pg_admin_url)
    try:
        with admin.connect() as conn:
            left = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": two["pg_database"]})
            assert left.first() is None  # the bench's database is dropped
    finally:
        admin.dispose()


def test_sim_fleet_mixed_row_counts_pull_polls_push_attestations_and_the_stores_groups(tmp_path: Path) -> None:
    """``bench.sim_fleet --push --mixed`` at a tiny size: a "mixed" row per N from one verifier in
    mode = both driven by the pull and the push agents together (polls and attestations apart, all
    of them attesting), its store's group commits read from its /metrics (pull records lingering in
    background groups, push requests' urgent writes), the model from the same run's pull and push
    rows, and the store counts of those rows too (the pull row's writes all background)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.sim_fleet", "--out", str(out), "--sizes", "4", "--seconds", "2",
           "--quote-interval", "1", "--register", "2", "--policy-files", str(POLICY_FILES), "--push", "--mixed",
           "--enrol-concurrency", "4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=GUARD * 5)  # a hang guard only
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    (row,) = json.loads((out / "sim_fleet.json").read_text())["rows"]
    mixed, pull, push = row["mixed"], row["keytrio 1 worker (SQLite)"], row["push"]
    assert mixed["mode"] == "both" and mixed["n"] == 4 and mixed["n_push"] == 4, mixed
    assert mixed["states"] == {str(states.GET_QUOTE): 8}, mixed  # pull and push agents all attesting
    assert mixed["pull_polls"] > 0 and mixed["push_attestations"] > 0 and mixed["push_passed"] > 0, mixed
    assert mixed["polls"] == mixed["pull_polls"] + mixed["push_attestations"] and mixed["cpu_per_poll"] > 0
    assert mixed["pull_polls_counted_by"] == "served" and mixed["pull_polls_committed"] > 0, mixed
    assert abs(mixed["pull_polls"] - mixed["pull_polls_committed"]) <= 2 * mixed["n"], mixed
    assert mixed["agent_errors"] == {} and mixed["latency_ms"]["evidence"] is not None, mixed
    store = mixed["store"]
    assert store["writes"]["background"] > 0 and store["writes"]["urgent"] > 0, store
    assert store["commits"]["all"] == sum(store["commits"][k] for k in ("background", "urgent", "mixed")) > 0
    assert store["mean_group"]["pull_group"] >= 1 and store["mean_group"]["push_group"] >= 1, store
    model = mixed["model"]
    assert model["pull_cpu_per_poll"] == pull["cpu_per_poll"] and model["push_cpu_per_attestation"] == push["cpu_per_poll"]
    assert model["predicted_cpu_per_s"] > 0 and model["measured_over_predicted"] > 0, model
    assert pull["store"]["writes"]["background"] > 0 and pull["store"]["writes"]["urgent"] == 0, pull["store"]
    assert push["store"]["writes"]["urgent"] > 0, push["store"]
    assert "[bench] sim keytrio mixed N=4+4" in done.stderr
    assert "--mixed" in subprocess.run([sys.executable, "-m", "bench.sim_fleet", "--help"], cwd=REPO,
                                       capture_output=True, text=True, timeout=GUARD).stdout  # fmt: skip
