"""Crash safety of the verifier: ``keytrio verifier --config F`` as a real subprocess, SIGKILLed.

Real agents (swtpm) run in the test process; agent a sits behind a verifier_support.RecordingProxy,
so the ``ima_ml_entry`` the verifier asks for is observed at the agent side; every agent's
revocation action records each notice it acts on (its action log). After each SIGKILL the
database is read directly (the committed truth) and the verifier is started again on it:

- every agent is monitored again, from its stored IMA line (not 0), its counters never go back;
- a notice stored while a recipient was unreachable is delivered once it is back, exactly once
  per agent (agents dedupe by notice_id; the action log shows one entry per notice);
- a seeded loop of >= 20 kills at random points keeps the invariants after every round.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier import records
from keytrio.actors.verifier.schema import agents, deliveries, notices
from keytrio.testbed.ima_log import ImaLog
from tests.actors.verifier_support import (
    BANKS,
    BASE,
    GUARD,
    POLL,
    RecordingProxy,
    RevocationPair,
    VAgent,
    doc_b64,
    enrol_body,
    new_halves,
    policy_doc,
    revocation_pair,
    start_test_agent,
    verifier_options,
)
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401
from tests.ports import free_port

pytestmark = pytest.mark.swtpm

ZERO32 = "00" * 32
REPO = Path(__file__).resolve().parents[3]



@dataclass
class VerifierProcess:
    """``keytrio verifier --config F`` in a subprocess; ``start``/``kill`` it as often as needed."""

    config: Path
    port: int
    pki: Any
    logs: Path
    prewarm: bool = False
    proc: trio.Process | None = None
    warm: trio.Process | None = None
    starts: int = 0
    spawned: int = 0
    admin: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.admin = make_client(tls.client_context([self.pki.ca], self.pki.client.cert, self.pki.client.key),
                                 timeout=10.0)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v2.1"

    # A pre-warmed interpreter: imports the keytrio entry point, then waits for a line on stdin
    # before running exactly what the ``keytrio`` console script runs (scenarios.cli.main). It
    # lets the kill loop start the next verifier without waiting for Python's imports each round.
    WARM = ("import sys, scenarios.cli, actors.verifier.actor, actors.verifier.cli; sys.stdin.readline(); "
            "sys.exit(scenarios.cli.main(sys.argv[1:]))")

    async def _spawn(self) -> trio.Process:
        self.spawned += 1
        log = open(self.logs / f"verifier-{self.spawned}.log", "wb")  # the child writes to it
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if self.prewarm:
            cmd = [sys.executable, "-c", self.WARM, "verifier", "--config", str(self.config)]
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=log, stderr=log, env=env)
        else:
            keytrio = Path(sys.executable).with_name("keytrio")
            proc = await trio.lowlevel.open_process(
                [str(keytrio), "verifier", "--config", str(self.config)], stdout=log, stderr=log, env=env)
        log.close()
        return proc

    async def start(self) -> None:
        if self.prewarm:
            proc = self.warm if self.warm is not None else await self._spawn()
            self.warm = None
            assert proc.stdin is not None
            await proc.stdin.send_all(b"go\n")
        else:
            proc = await self._spawn()
        self.proc = proc
        self.starts += 1
        logfile = self.logs / f"verifier-{self.spawned}.log"
        with trio.fail_after(GUARD):
            while True:
                assert proc.returncode is None, logfile.read_text()[-3000:]
                try:
                    if (await self.admin.get(f"https://127.0.0.1:{self.port}/version")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(POLL)
        if self.prewarm:  # the next one imports while this one runs
            self.warm = await self._spawn()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL  # dead: no monitor of it can survive
        self.proc = None

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        resp = await self.admin.request(method, self.url + path, json=body)
        policy = path.startswith(("/allowlists/", "/mbpolicies/"))  # upstream's 201 / 204 there
        code = {"POST": 201, "PUT": 201, "DELETE": 204}.get(method, 200) if policy else 200
        assert resp.status_code == code, resp.text
        return resp.json()["results"] if resp.content else {}

    async def wait(self, agent_id: str, pred: Any) -> dict[str, Any]:
        with trio.fail_after(GUARD):
            while True:
                rec = await self.call("GET", f"/agents/{agent_id}")
                if pred(rec):
                    return rec
                await trio.sleep(POLL)

    async def close(self) -> None:
        if self.proc is not None:
            await self.kill()
        if self.warm is not None:
            self.warm.kill()
            await self.warm.wait()
        await self.admin.aclose()


def write_config(path: Path, opts: dict[str, Any]) -> None:
    path.write_text("[verifier]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items()))


def db_rows(url: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(agents by id, notices, deliveries) as committed."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ags = {r["agent_id"]: dict(r) for r in conn.execute(sa.select(agents)).mappings()}
            ns = [dict(r) for r in conn.execute(sa.select(notices)).mappings()]
            ds = [dict(r) for r in conn.execute(sa.select(deliveries)).mappings()]
        return ags, ns, ds
    finally:
        engine.dispose()


def notice_ids(agent: VAgent) -> list[str]:
    """The notice_id of every notice the agent's revocation action ran for (its action log)."""
    return [json.loads(m)["notice_id"] for m in agent.notices()]


@dataclass
class World:
    a: VAgent
    b: VAgent
    log: ImaLog
    proxy: RecordingProxy
    vp: VerifierProcess
    url: str
    pair: RevocationPair


async def make_world(nursery: trio.Nursery, tmp: Path, pki: Any, swtpm: Any, swtpm_factory: Any, url: str,
                     prewarm: bool = False, **opts: Any) -> World:
    pair = revocation_pair(tmp / "revocation")
    b_tpm = await swtpm_factory(fresh=False)
    a = await start_test_agent(nursery, tmp / "a", pki, swtpm.tcti, pair)
    b = await start_test_agent(nursery, tmp / "b", pki, b_tpm.tcti, pair)
    assert a.run.agent.tpm is not None
    log = ImaLog(a.run.ima_path, a.run.agent.tpm.extend, BANKS)
    for path, content in BASE.items():
        await log.measure(path, content)
    proxy = RecordingProxy(pki, a.address, a.run.info.mtls_cert)
    proxy_port = await nursery.start(proxy.run)
    port = free_port()
    options = verifier_options(pki, tmp / "verifier", port=port, database_url=url, max_retries=100000,
                               revocation_max_retry_interval=0.5, **opts)
    write_config(tmp / "verifier.toml", options)
    vp = VerifierProcess(tmp / "verifier.toml", port, pki, tmp, prewarm=prewarm)
    await vp.start()
    await vp.call("POST", "/allowlists/base", {"runtime_policy": doc_b64(policy_doc(BASE, excludes=("/usr/bin/late.*",))), "runtime_policy_key": "",
                                               "tpm_policy": ""})
    body = enrol_body(a, v=new_halves().v, address=("127.0.0.1", proxy_port), mtls_cert=pki.agent.pem,
                      revocation_key=pair.key_pem)
    body["runtime_policy_name"] = "base"
    await vp.call("POST", f"/agents/{a.agent_id}", body)
    await vp.call("POST", f"/agents/{b.agent_id}", enrol_body(
        b, v=new_halves().v, revocation_key=pair.key_pem, tpm_policy={"15": [ZERO32], "mask": "0x8000"}))
    return World(a, b, log, proxy, vp, url, pair)


def entries_after(proxy: RecordingProxy, start: int) -> list[int]:
    return [int(p["ima_ml_entry"]) for p in proxy.integrity_params()[start:]]


async def test_sigkill_mid_poll_and_with_pending_notices(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, swtpm_factory: Any, db_url: str  # noqa: F811
) -> None:
    w = await make_world(nursery, tmp_path, pki, swtpm, swtpm_factory, db_url)
    a, b, vp = w.a, w.b, w.vp
    try:
        await vp.wait(a.agent_id, lambda r: r["attestation_count"] >= 3)
        await vp.wait(b.agent_id, lambda r: r["attestation_count"] >= 3)
        for i in range(3):
            await w.log.measure(f"/usr/bin/late{i}", b"late")
        n_lines = len(a.run.ima_path.read_text().splitlines())
        with trio.fail_after(GUARD):  # the verifier asked from n_lines: it stored that progress
            while n_lines not in entries_after(w.proxy, 0):
                await trio.sleep(POLL)

        # 1. SIGKILL in the middle of polling (both monitors are busy; quote_interval 0.2 s)
        await trio.sleep(random.Random(6).uniform(0.05, 0.3))
        await vp.kill()
        stored, _, _ = db_rows(w.url)
        assert stored[a.agent_id]["next_ima_ml_entry"] == n_lines
        mark = len(w.proxy.integrity_params())
        await vp.start()
        for aid in (a.agent_id, b.agent_id):
            rec = await vp.wait(aid, lambda r, aid=aid: r["attestation_count"] >= stored[aid]["attestation_count"] + 2)
            assert rec["operational_state"] == records.GET_QUOTE
        asked = entries_after(w.proxy, mark)
        assert asked and asked[0] == n_lines and all(e == n_lines for e in asked), asked  # no re-read from 0

        # 2. b goes away; a fails -> the notice is stored with pending deliveries (b unreachable)
        b_port = b.address[1]
        await b.run.stop()
        await w.log.measure("/usr/bin/evil", b"evil")  # not in a's runtime policy
        rec = await vp.wait(a.agent_id, lambda r: r["operational_state"] == records.INVALID_QUOTE)
        rec_b = await vp.wait(b.agent_id, lambda r: r["pending_notices"] >= 1)
        assert rec_b["operational_state"] == records.GET_QUOTE_RETRY
        def a_delivered() -> bool:  # the agent has it, and the outbox has written that down
            states = {d["recipient"]: d["state"] for d in db_rows(w.url)[2]}
            return len(a.notices()) >= 1 and states.get(a.agent_id) == "delivered"

        with trio.fail_after(GUARD):
            while not a_delivered():  # a itself is reachable: it gets the notice at once
                await trio.sleep(POLL)
        _, ns, ds = db_rows(w.url)
        [notice] = ns
        assert {d["recipient"]: d["state"] for d in ds} == {a.agent_id: "delivered", b.agent_id: "pending"}

        # SIGKILL while the notice is pending, restart (b still down), then b comes back
        await vp.kill()
        await vp.start()
        await trio.sleep(0.5)  # the restarted outbox retries b (still down) meanwhile
        b2 = await start_test_agent(nursery, tmp_path / "b", pki, b.tcti, w.pair, port=b_port)
        await vp.wait(b.agent_id, lambda r: r["pending_notices"] == 0)
        _, _, ds = db_rows(w.url)
        assert {d["recipient"]: d["state"] for d in ds} == {a.agent_id: "delivered", b.agent_id: "delivered"}
        await vp.wait(b.agent_id, lambda r: r["operational_state"] == records.GET_QUOTE)
        assert notice_ids(b2) == [notice["notice_id"]]  # exactly once at b
        assert notice_ids(a) == [notice["notice_id"]]  # and once at a
    finally:
        await vp.close()


ROUNDS = 20


async def test_kill_restart_loop_keeps_invariants(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, swtpm_factory: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'verifier.sqlite'}"
    q = 0.2  # quote_interval (verifier_options)
    w = await make_world(nursery, tmp_path, pki, swtpm, swtpm_factory, url, prewarm=True)
    a, b, vp = w.a, w.b, w.vp
    rng = random.Random(20240611)
    try:
        await vp.wait(a.agent_id, lambda r: r["attestation_count"] >= 2)
        n_lines = len(a.run.ima_path.read_text().splitlines())
        await vp.kill()
        expected = {a.agent_id, b.agent_id}
        last = {aid: 0 for aid in expected}
        for rnd in range(ROUNDS):
            mark = len(w.proxy.integrity_params())
            await vp.start()
            ready = trio.current_time()
            if rnd == 5:  # b's policy PCR changes: b fails, a notice goes to a and b
                assert b.run.agent.tpm is not None
                await b.run.agent.tpm.extend(15, {"sha256": hashlib.sha256(b"changed").digest()})
            if rnd == 12:  # reactivated, b fails again: a second notice
                await vp.call("PUT", f"/agents/{b.agent_id}/reactivate")
            if rnd in (5, 12):
                # the kill comes right after the failure's notice is stored (its delivery may be
                # under way): on a loaded machine a random window alone may close before the poll
                with trio.fail_after(GUARD):
                    while len(db_rows(url)[1]) < (1 if rnd == 5 else 2):
                        await trio.sleep(POLL)
            await trio.sleep(rng.uniform(0.05, 0.6))
            window = trio.current_time() - ready
            await vp.kill()

            ags, ns, ds = db_rows(url)
            assert set(ags) == expected, rnd  # no enrolled agent missing
            for aid in expected:  # counters never go back
                assert ags[aid]["attestation_count"] >= last[aid], (rnd, aid)
                last[aid] = ags[aid]["attestation_count"]
            assert ags[a.agent_id]["next_ima_ml_entry"] == n_lines, rnd  # IMA progress kept
            asked = entries_after(w.proxy, mark)
            assert all(e == n_lines for e in asked), (rnd, asked)  # resumed from the stored line
            # one monitor per agent: at most one quote per quote_interval (two would double it)
            assert len(asked) <= window / q + 2, (rnd, len(asked), window)
            for n in ns:  # no lost notice: each stored with a delivery row for every agent
                assert {d["recipient"] for d in ds if d["notice_id"] == n["notice_id"]} == expected
        assert last[a.agent_id] > 2  # a was attested across the rounds

        # the end: every stored notice reaches every agent, exactly once each
        await vp.start()
        _, ns, _ = db_rows(url)
        assert len(ns) == 2, [n["event_id"] for n in ns]
        for aid in expected:
            await vp.wait(aid, lambda r: r["pending_notices"] == 0)
        _, _, ds = db_rows(url)
        assert {d["state"] for d in ds} == {"delivered"}
        want = sorted(n["notice_id"] for n in ns)
        for agent in (a, b):
            with trio.fail_after(GUARD):
                while len(notice_ids(agent)) < 2:  # the actions run in the background
                    await trio.sleep(POLL)
            assert sorted(notice_ids(agent)) == want, agent.agent_id
        rec = await vp.wait(a.agent_id, lambda r: r["attestation_count"] > last[a.agent_id])
        assert rec["operational_state"] == records.GET_QUOTE
    finally:
        await vp.close()
