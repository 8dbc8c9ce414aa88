"""The push fleet's simulated agents (bench.sim_push) against keytrio's real registrar and verifier,
and (bench.sim_push_upstream) against upstream Keylime 7.14.3's registrar and verifier in push mode.

Real sockets (HTTP to the registrar, TLS to the verifier's v3 routes), real SQLite, real RSA-2048
keys in software: two agents register, are enrolled in push mode with the bench's named runtime
policy, open a PoP session (software TPM2_Certify) and push one capabilities -> evidence cycle
each, which passes; an agent whose IMA log has one forged line fails. The same on upstream's push
verifier (tests/interop/upstream/up.sh, ``KL_VERIFIER_MODE=push``), then a tiny bench window there
(N=2, a few attestations) so the upstream side of ``./scripts/bench --sim --push --upstream`` cannot
rot. The hang guards are guards only; nothing here is timed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio

from bench import fleet, sim_agent, sim_keys, sim_push, sim_push_upstream
from keytrio.actors.common import tls
from keytrio.testbed.pki import make_cv_ca
from tests.bench_actors import start_registrar, start_verifier
from tests.interop.support import Upstream, upstream_instance

GUARD = 60.0  # seconds: a hang guard, never what the test asserts
POLICY_FILES = 40


async def _verdict(admin: httpx.AsyncClient, url: str, agent_id: str, ok: int = 200) -> dict[str, Any]:
    while True:
        r = await admin.get(f"{url}/v3/agents/{agent_id}/attestations/latest")
        assert r.status_code == ok, r.text
        attrs = r.json()["data"]["attributes"]
        if attrs["stage"] == "verification_complete":
            return attrs
        await trio.sleep(0.1)


@pytest.mark.parametrize("client", ["lean", "httpx"])
async def test_simulated_push_agents_attest_and_a_forged_log_fails(tmp_path: Path, client: str) -> None:
    ca = make_cv_ca(tmp_path / "cv_ca").dir
    pool = await trio.to_thread.run_sync(sim_keys.PrimePool, 2)  # 6 keys: three agents
    sims = sim_agent.SimAgents(ca / "cacert.crt", pool, POLICY_FILES, tmp_path / "sim")
    sims.port = 9002  # registered, never listened on: push agents only dial out
    one, two, forged = sims.grow(3, tamper=frozenset({2}), salt="push")
    ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
    async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=ctx, timeout=20.0) as admin:
        registrar = await start_registrar(nursery, ca, tmp_path / "registrar")
        assert await sims.register([one, two, forged], registrar) == 3
        url = await start_verifier(nursery, ca, tmp_path / "verifier", quote_interval=2.0, mode="push")
        r = await admin.post(f"{url}/v2.1/allowlists/{fleet.POLICY_NAME}",
                             json=fleet.policy_body(POLICY_FILES, {one.entries[0].digest.hex()}))
        assert r.status_code in (200, 201), r.text
        for a in (one, two, forged):
            r = await admin.post(f"{url}/v2.1/agents/{a.agent_id}", json=sim_push.push_enrolment(a))
            assert r.status_code == 200, r.text

        async with sim_push.push_client(ca / "cacert.crt", 3) as shared:
            transport = tls.client_context([ca / "cacert.crt"]) if client == "lean" else shared
            agents = [sim_push.PushAgent(a, url, transport) for a in (one, two, forged)]
            with trio.fail_after(GUARD):
                start = time.monotonic()
                for a in agents:
                    wait = await a.cycle()
                    assert a.token is not None and a.sent == 1 and not a.errors, a.errors
                    assert wait >= 1  # the verifier's seconds_to_next_attestation
                # at once another cycle on the kept connection: 429 premature_attestation, and the
                # wait is its Retry-After (the lean client's reuse path and its header reading)
                wait = await agents[0].cycle()
                assert agents[0].errors == {"capabilities 429": 1} and wait >= 1, (agents[0].errors, wait)
                # each success answer's latency is kept (the 429 is not one), as the window reports it
                assert [(len(a.answers["capabilities"]), len(a.answers["evidence"])) for a in agents] == [(1, 1)] * 3
                lat = sim_push.latency_ms(agents, start, time.monotonic())
                assert all(v is not None and 0 < v < GUARD * 1000 for v in lat.values()), lat
                assert sim_push.latency_ms(agents, start - 10, start) == {"capabilities": None, "evidence": None}
                verdicts = [await _verdict(admin, url, a.sim.agent_id) for a in agents]
                for a in agents:
                    if a.lean is not None:
                        a.lean.close()
        assert [v["evaluation"] for v in verdicts] == ["pass", "pass", "fail"], verdicts
        r = await admin.get(f"{url}/v2.1/agents/", params={"verifier": "", "bulk": "1"})
        counts = {i: rec["attestation_count"] for i, rec in r.json()["results"].items()}
        assert counts == {one.agent_id: 1, two.agent_id: 1, forged.agent_id: 0}, counts
        nursery.cancel_scope.cancel()


def test_latency_is_the_median_of_the_answers_within_the_window() -> None:
    def agent(caps: list[tuple[float, float]], ev: list[tuple[float, float]]) -> Any:
        return SimpleNamespace(answers={"capabilities": caps, "evidence": ev})

    agents = [agent([(1.0, 0.5), (5.0, 0.010), (9.0, 0.050)], [(5.1, 0.002)]),
              agent([(6.0, 0.020)], [(6.1, 0.004), (6.2, 0.009), (20.0, 9.0)])]
    assert sim_push.latency_ms(agents, 5.0, 9.0) == {"capabilities": 20.0, "evidence": 4.0}
    assert sim_push.latency_ms(agents, 10.0, 19.0) == {"capabilities": None, "evidence": None}


@pytest.fixture(scope="module")
def push_upstream() -> Iterator[Upstream]:
    with upstream_instance({**sim_push_upstream.UP_ENV, "KL_QUOTE_INTERVAL": "2"},
                           prefix="keytrio-bench-push-") as up:
        yield up


def _sims(up: Upstream, tmp: Path, n: int, tamper: frozenset[int], salt: str) -> list[sim_agent.SimAgent]:
    pool = sim_keys.PrimePool(sim_agent.keys_for(n))
    sims = sim_agent.SimAgents(up.ca.dir / "cacert.crt", pool, POLICY_FILES, tmp / "sim")
    return sims.grow(n, tamper=tamper, salt=salt)


@pytest.mark.interop
async def test_simulated_push_agents_on_upstreams_push_verifier(push_upstream: Upstream, tmp_path: Path) -> None:
    up = sim_push_upstream.UpstreamPush(push_upstream.dir)
    one, two, forged = await trio.to_thread.run_sync(_sims, push_upstream, tmp_path, 3, frozenset({2}), "up-push")
    # upstream's registrar (v2.x: its v3.0 routes answer 500) takes them without a contact
    assert await sim_push.register([one, two, forged], up.registrar) == 3
    async with up.admin(20.0) as admin:
        await fleet._upload(admin, up.url, fleet.policy_body(POLICY_FILES, {one.entries[0].digest.hex()}))
        for a in (one, two, forged):
            r = await admin.post(f"{up.url}/v{fleet.API}/agents/{a.agent_id}", json=sim_push.push_enrolment(a))
            assert r.status_code == 200, r.text
        async with sim_push.push_client(up.ca / "cacert.crt", 3) as client:
            agents = [sim_push.PushAgent(a, up.url, client) for a in (one, two, forged)]
            with trio.fail_after(GUARD):
                for a in agents:
                    wait = await a.cycle()
                    assert a.token is not None and a.sent == 1 and not a.errors, (a.errors, a.first_error)
                    assert wait == up.quote_interval  # upstream's seconds_to_next_attestation
                # upstream answers an admin's GET of an attestation with 201 (PUSH_MODEL_WIRE.md item 3)
                verdicts = [await _verdict(admin, up.url, a.sim.agent_id, ok=201) for a in agents]
        # the forged line is a file digest outside the policy: upstream's policy check fails it
        assert [v["evaluation"] for v in verdicts] == ["pass", "pass", "fail"], verdicts
        _t, recs = await sim_push._bulk(admin, up.url)
        counts = {i: recs[i]["attestation_count"] for i in (one.agent_id, two.agent_id, forged.agent_id)}
        assert counts == {one.agent_id: 1, two.agent_id: 1, forged.agent_id: 0}, counts
        assert await fleet._delete_all(admin, up.url, list(counts), timeout=GUARD)


@pytest.mark.interop
async def test_bench_window_on_upstreams_push_verifier(push_upstream: Upstream, tmp_path: Path) -> None:
    up = sim_push_upstream.UpstreamPush(push_upstream.dir)
    sims = await trio.to_thread.run_sync(_sims, push_upstream, tmp_path, 2, frozenset(), "up-bench")
    body = fleet.policy_body(POLICY_FILES, {s.entries[0].digest.hex() for s in sims})
    with trio.fail_after(GUARD * 3):
        row = await sim_push_upstream.upstream_push_side(up, sims, body, seconds=3.0, register=1)
    assert up.registered == {sims[0].agent_id}
    assert row["n"] == 2 and row["attested_at_start"] == 2 and row["deleted_after"], row
    assert row["agent_errors"] == {}, row["first_errors"]
    assert row["polls"] > 0 and row["cpu_per_poll"] > 0 and row["processes"] >= 1, row
    assert row["states"] == {"3": 2}, row  # GET_QUOTE: attesting, none failed


async def test_push_side_hands_the_push_verifiers_pid_to_the_window_hook(tmp_path: Path) -> None:
    """``bench.sim_fleet --py-spy FILE --py-spy-of push`` attaches py-spy through push_side's
    ``on_window``: called once, as the window opens, with the pid of the push-mode verifier that
    push_side started (running then), and the window is measured as without it."""
    ca = make_cv_ca(tmp_path / "cv_ca").dir
    pool = await trio.to_thread.run_sync(sim_keys.PrimePool, 1)
    sims = sim_agent.SimAgents(ca / "cacert.crt", pool, POLICY_FILES, tmp_path / "sim")
    sims.port = 9002
    agents = sims.grow(2, salt="push")
    body = fleet.policy_body(POLICY_FILES, {a.entries[0].digest.hex() for a in agents})
    seen: list[tuple[int, str]] = []

    def on_window(pid: int) -> None:
        seen.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")))

    ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
    with (tmp_path / "verifier.log").open("w") as log, trio.fail_after(GUARD * 3):
        async with httpx.AsyncClient(verify=ctx, timeout=20.0) as admin:
            row = await sim_push.push_side(admin, ca, tmp_path / "verifier", max(os.sched_getaffinity(0)), log,
                                           agents, body, 1.0, 2.0, on_window=on_window)
    assert len(seen) == 1, seen
    _pid, cmdline = seen[0]
    assert "keytrio_server" in cmdline and '"mode": "push"' in cmdline, cmdline
    assert row["mode"] == "push" and row["polls"] > 0 and row["passed"] > 0, row
