"""The push fleet's simulated agents (bench.sim_push) against keytrio's real registrar and verifier.

Real sockets (HTTP to the registrar, TLS to the verifier's v3 routes), real SQLite, real RSA-2048
keys in software: two agents register, are enrolled in push mode with the bench's named runtime
policy, open a PoP session (software TPM2_Certify) and push one capabilities -> evidence cycle
each, which passes; an agent whose IMA log has one forged line fails. The hang guard is a guard
only; nothing here is timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from bench import fleet, sim_agent, sim_keys, sim_push
from keytrio.actors.common import tls
from keytrio.actors.registrar.actor import Registrar
from keytrio.actors.registrar.config import load_config as registrar_config
from keytrio.actors.verifier.actor import Verifier
from keytrio.actors.verifier.config import load_config as verifier_config
from keytrio.testbed.pki import make_cv_ca

GUARD = 60.0  # seconds: a hang guard, never what the test asserts
POLICY_FILES = 40


async def _registrar(nursery: trio.Nursery, ca: Path, data: Path) -> str:
    opts = {
        "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(data), "metrics_port": -1,
        "server_cert": str(ca / "server-cert.crt"), "server_key": str(ca / "server-private.pem"),
        "trusted_client_ca": [str(ca / "cacert.crt")], "graceful_timeout": 0.5,
    }  # fmt: skip
    addrs = await nursery.start(Registrar(registrar_config(None, env={}, overrides=opts)).run)
    return f"http://127.0.0.1:{addrs.http[1]}"


async def _push_verifier(nursery: trio.Nursery, ca: Path, data: Path) -> str:
    opts = {
        "ip": "127.0.0.1", "port": 0, "metrics_port": -1, "data_dir": str(data), "quote_interval": 2.0,
        "mode": "push",
        "server_cert": str(ca / "server-cert.crt"), "server_key": str(ca / "server-private.pem"),
        "client_cert": str(ca / "client-cert.crt"), "client_key": str(ca / "client-private.pem"),
        "trusted_client_ca": [str(ca / "cacert.crt")], "trusted_server_ca": [str(ca / "cacert.crt")],
        "graceful_timeout": 0.5,
    }  # fmt: skip
    host, port = await nursery.start(Verifier(verifier_config(env={}, overrides=opts)).run)
    return f"https://{host}:{port}"


async def _verdict(admin: httpx.AsyncClient, url: str, agent_id: str) -> dict[str, Any]:
    while True:
        r = await admin.get(f"{url}/v3/agents/{agent_id}/attestations/latest")
        assert r.status_code == 200, r.text
        attrs = r.json()["data"]["attributes"]
        if attrs["stage"] == "verification_complete":
            return attrs
        await trio.sleep(0.1)


async def test_simulated_push_agents_attest_and_a_forged_log_fails(tmp_path: Path) -> None:
    ca = make_cv_ca(tmp_path / "cv_ca").dir
    pool = await trio.to_thread.run_sync(sim_keys.PrimePool, 2)  # 6 keys: three agents
    sims = sim_agent.SimAgents(ca / "cacert.crt", pool, POLICY_FILES, tmp_path / "sim")
    sims.port = 9002  # registered, never listened on: push agents only dial out
    one, two, forged = sims.grow(3, tamper=frozenset({2}), salt="push")
    ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
    async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=ctx, timeout=20.0) as admin:
        registrar = await _registrar(nursery, ca, tmp_path / "registrar")
        assert await sims.register([one, two, forged], registrar) == 3
        url = await _push_verifier(nursery, ca, tmp_path / "verifier")
        r = await admin.post(f"{url}/v2.1/allowlists/{fleet.POLICY_NAME}",
                             json=fleet.policy_body(POLICY_FILES, {one.entries[0].digest.hex()}))
        assert r.status_code in (200, 201), r.text
        for a in (one, two, forged):
            r = await admin.post(f"{url}/v2.1/agents/{a.agent_id}", json=sim_push.push_enrolment(a))
            assert r.status_code == 200, r.text

        async with sim_push.push_client(ca / "cacert.crt", 3) as client:
            agents = [sim_push.PushAgent(a, url, client) for a in (one, two, forged)]
            with trio.fail_after(GUARD):
                for a in agents:
                    wait = await a.cycle()
                    assert a.token is not None and a.sent == 1 and not a.errors, a.errors
                    assert wait >= 1  # the verifier's seconds_to_next_attestation
                verdicts = [await _verdict(admin, url, a.sim.agent_id) for a in agents]
        assert [v["evaluation"] for v in verdicts] == ["pass", "pass", "fail"], verdicts
        r = await admin.get(f"{url}/v2.1/agents/", params={"verifier": "", "bulk": "1"})
        counts = {i: rec["attestation_count"] for i, rec in r.json()["results"].items()}
        assert counts == {one.agent_id: 1, two.agent_id: 1, forged.agent_id: 0}, counts
        nursery.cancel_scope.cancel()
