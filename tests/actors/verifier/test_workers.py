"""``workers = N`` (actors/verifier/workers.py): ``keytrio verifier`` as a supervisor of N real
worker processes on one real port and one real PostgreSQL, with real agents (swtpm).

Which worker answers a connection is proven by stopping the other one (SIGSTOP): the supervisor
never accepts, so an answer while worker B is stopped came from worker A. Waits are bounded rounds
of polling under a hang guard (``fail_after``), never sleeps standing in for an outcome.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.common.config import ConfigError
from keytrio.actors.common.startup import Exit
from keytrio.actors.verifier import records
from keytrio.actors.verifier.config import load_config, resolve, worker_count
from keytrio.actors.verifier.workers import BACKOFF_MAX, backoff
from keytrio.testbed.ima_log import ImaLog
from tests.actors.service_support import KEYTRIO, clean_env, one_line, verifier_options, write
from tests.actors.verifier.push_support import PATHS, SoftAgent, policy_for, push_enrol_body
from tests.actors.verifier.push_support import entry as push_entry
from tests.actors.verifier_support import (
    BANKS,
    BASE,
    doc_b64,
    enrol_body,
    new_halves,
    policy_doc,
    start_test_agent,
)
from tests.pg import pg_admin_url, pg_url  # noqa: F401
from tests.ports import free_port

PA = "a0000000-0000-4000-8000-0000000000b1"
GUARD = 90.0  # hang guard of one wait (bounded rounds of polling inside)
POLL = 0.2


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads: trio spawns from a worker thread)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return sorted(out)


def state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (T: stopped), "" when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def state_is(pid: int, letter: str) -> bool:
    return state(pid) == letter


async def until(pred: Callable[[], Any], what: str) -> Any:
    """Poll ``pred`` (sync or async) until it returns something truthy; returns that."""
    try:
        with trio.fail_after(GUARD):
            while True:
                value = pred()
                if hasattr(value, "__await__"):
                    value = await value
                if value:
                    return value
                await trio.sleep(POLL)
    except trio.TooSlowError:
        raise AssertionError(f"not within {GUARD} s: {what}") from None


# --- configuration ----------------------------------------------------------------------------------


def test_worker_count_defaults_to_cores_on_postgresql_and_one_on_sqlite(tmp_path: Path) -> None:
    pg = "postgresql+psycopg://u@h/db"
    cores = len(os.sched_getaffinity(0))
    base = {"data_dir": str(tmp_path)}
    assert worker_count(load_config(env={}, overrides=base)) == 1  # SQLite in data_dir
    assert worker_count(load_config(env={}, overrides={**base, "database_url": pg})) == cores
    assert worker_count(load_config(env={}, overrides={**base, "database_url": pg, "mode": "both"})) == 1
    assert worker_count(load_config(env={}, overrides={**base, "database_url": pg, "workers": 3})) == 3
    with pytest.raises(ConfigError) as err:
        resolve(load_config(env={}, overrides={**base, "workers": 2}))
    assert "workers: more than 1 needs a PostgreSQL" in str(err.value)
    with pytest.raises(ConfigError) as err:  # only the missing TLS files here: push may run N workers
        resolve(load_config(env={}, overrides={**base, "workers": 2, "database_url": pg, "mode": "push"}))
    assert "workers" not in str(err.value) and "server_cert" in str(err.value)
    with pytest.raises(ConfigError) as err:  # worker 1 would serve its metrics on 65536
        resolve(load_config(env={}, overrides={**base, "database_url": pg, "workers": 2, "metrics_port": 65535}))
    assert "metrics_port: worker i serves metrics_port + i: 65535 + 1 is past 65535" in str(err.value)


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(30) == BACKOFF_MAX


# --- start-up failures keep their exit codes -----------------------------------------------------


def run_verifier(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYTRIO), "verifier", "--config", str(conf)], capture_output=True, text=True,
                          timeout=120, env=clean_env())


def test_workers_start_up_failures_exit_codes(tmp_path: Path, pki: Any, pg_url: str) -> None:  # noqa: F811
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", database_url=pg_url, workers=2, port=taken))
        one_line(run_verifier(conf), Exit.PORT_IN_USE, f"port 127.0.0.1:{taken} is already in use")
        # worker 1's metrics port (metrics_port + 1) is the one taken
        conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", database_url=pg_url, workers=2,
                                            metrics_port=taken - 1))
        one_line(run_verifier(conf), Exit.PORT_IN_USE, f"metrics_port 127.0.0.1:{taken}")
    nowhere = f"postgresql+psycopg://keytrio:x@127.0.0.1:{free_port()}/keytrio"
    conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", database_url=nowhere, workers=2))
    one_line(run_verifier(conf), Exit.DATABASE, "unreachable")
    conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", workers=2))  # SQLite
    one_line(run_verifier(conf), Exit.CONFIG, "workers: more than 1 needs a PostgreSQL")


# --- two workers, one port, real agents --------------------------------------------------------------


class Service:
    """``keytrio verifier`` (the supervisor process) and a client making one connection per call."""

    def __init__(self, proc: trio.Process, url: str, pki: Any, db: str) -> None:
        self.proc, self.url, self.pki = proc, url, pki
        self.engine = sa.create_engine(db)

    async def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        # a new client (and connection) each time: the kernel picks the worker per connection
        async with make_client(tls.client_context([self.pki.ca], self.pki.client.cert, self.pki.client.key),
                               timeout=20.0) as client:
            return await client.request(method, self.url + path, json=body)

    async def agent(self, agent_id: str) -> dict[str, Any] | None:
        r = await self.request("GET", f"/agents/{agent_id}")
        return r.json()["results"] if r.status_code == 200 else None

    async def counts(self, ids: set[str]) -> dict[str, int]:
        return {aid: ((await self.agent(aid)) or {}).get("attestation_count", -1) for aid in ids}

    async def listed(self) -> set[str]:
        r = await self.request("GET", "/agents/")
        assert r.status_code == 200, r.text
        return {a for sub in r.json()["results"]["uuids"] for a in sub}

    async def answers(self) -> bool:
        try:
            return (await self.request("GET", "/agents/")).status_code == 200
        except httpx.TransportError:
            return False

    def holders(self) -> dict[str, set[str]]:
        """Lease holder instance -> the agents it holds (rows of verifier_leases)."""
        def q() -> dict[str, set[str]]:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT holder, name FROM verifier_leases WHERE kind = 'agent'"))
                out: dict[str, set[str]] = {}
                for holder, name in rows:
                    out.setdefault(holder, set()).add(name)
                return out
        return q()

    def workers(self) -> list[int]:
        return children(self.proc.pid)


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def served_while_stopped(svc: Service, stop: int, ids: set[str]) -> None:
    """With worker ``stop`` stopped, every fresh connection is answered by the other worker, and it
    lists every agent."""
    with stopped(stop):
        await until(lambda: state(stop) == "T", "the worker is stopped")
        for _ in range(3):
            assert await svc.listed() == ids


@pytest.mark.swtpm
async def test_two_workers_share_one_port_split_agents_restart_and_stop(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm_factory: Any, pg_url: str  # noqa: F811
) -> None:
    agents = []
    for i in range(4):
        tpm = await swtpm_factory(fresh=False)
        agent = await start_test_agent(nursery, tmp_path / f"a{i}", pki, tpm.tcti, None)
        assert agent.run.agent.tpm is not None
        log = ImaLog(agent.run.ima_path, agent.run.agent.tpm.extend, BANKS)
        for path, content in BASE.items():
            await log.measure(path, content)
        agents.append(agent)
    ids = {a.agent_id for a in agents}
    mport = free_port(consecutive=2)
    opts = verifier_options(pki, tmp_path / "v", database_url=pg_url, workers=2, metrics_port=mport,
                   verifier_id="workers", quote_interval=0.5, lease_ttl=4.0, retry_interval=0.2,
                   database_pool_sz_ovfl="3,2", request_timeout=5.0)
    conf = write(tmp_path, "verifier", opts)
    log = open(tmp_path / "verifier.log", "wb")  # closed below
    proc: trio.Process = await nursery.start(partial(
        trio.run_process, [str(KEYTRIO), "verifier", "--config", str(conf)], stderr=log, check=False,
        env=clean_env()))
    svc = Service(proc, f"https://127.0.0.1:{opts['port']}/v2.1", pki, pg_url)
    try:
        first = await until(lambda: len(w := svc.workers()) == 2 and w, "two workers")
        await until(svc.answers, "the port answers")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(tmp_path / 'verifier.log').read_text()}") from None
    for p in (mport, mport + 1):  # one metrics listener per worker
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(f"http://127.0.0.1:{p}/metrics")).status_code == 200

    # runtime policies accepted by whichever worker took the request, used by whichever polls:
    # two agents name an uploaded policy, two bring theirs inline
    r = await svc.request("POST", "/allowlists/base", {"runtime_policy": doc_b64(policy_doc(BASE)),
                                                       "runtime_policy_key": "", "tpm_policy": ""})
    assert r.status_code == 201, r.text
    for i, agent in enumerate(agents):
        body = enrol_body(agent, v=new_halves().v)
        if i % 2:
            body["runtime_policy_name"] = "base"
        else:
            body["runtime_policy"] = doc_b64(policy_doc({**BASE, f"/usr/bin/own{i}": b"own"}))
        r = await svc.request("POST", f"/agents/{agent.agent_id}", body)
        assert r.status_code == 200, r.text
    # the agents split between the two workers' lease instances, and each is attested
    await until(lambda: sorted(len(v) for k, v in svc.holders().items() if k) == [2, 2], "a 2/2 split")

    async def attested(at_least: dict[str, int]) -> bool:
        now = await svc.counts(ids)
        return all(now[a] >= at_least[a] for a in ids)

    await until(partial(attested, dict.fromkeys(ids, 2)), "every agent attested")
    for aid in ids:
        assert (await svc.agent(aid) or {}).get("operational_state") == records.GET_QUOTE, await svc.agent(aid)
    # both workers serve the one port; each lists every agent
    await served_while_stopped(svc, first[0], ids)
    await served_while_stopped(svc, first[1], ids)

    # kill -9 one worker: the supervisor starts a new one, and every agent is attested again
    victim = first[0]
    before = await svc.counts(ids)
    os.kill(victim, signal.SIGKILL)
    second = await until(lambda: len(w := svc.workers()) == 2 and victim not in w and w, "a restarted worker")
    assert first[1] in second
    await until(partial(attested, {a: before[a] + 2 for a in ids}), "attested again after the kill")
    await until(lambda: sorted(len(v) for k, v in svc.holders().items() if k) == [2, 2], "2/2 again")

    # SIGTERM to the supervisor: every worker stops cleanly and gives its leases back
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(GUARD):
        await proc.wait()
    log.close()
    text = (tmp_path / "verifier.log").read_text()
    assert proc.returncode == 0, text
    await until(lambda: not any(state(p) for p in second), "the workers are gone")
    assert set(svc.holders()) == {None}, svc.holders()
    assert "Traceback" not in text and "event=verifier.workers_stopped workers=2" in text
    assert text.count("event=verifier.stopped") == 2, text  # the two live workers; the killed one never
    svc.engine.dispose()


async def test_any_free_port_and_workers_stop_when_the_supervisor_is_killed(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, pg_url: str  # noqa: F811
) -> None:
    """port = 0 and metrics_port = 0: one shared free port, one free metrics port per worker (the
    supervisor logs them); SIGKILL to the supervisor: each worker sees its stdin close and stops
    cleanly by itself (no orphans left polling)."""
    opts = verifier_options(pki, tmp_path / "v", database_url=pg_url, workers=2, port=0, metrics_port=0,
                   verifier_id="orphans", lease_ttl=4.0)
    conf = write(tmp_path, "verifier", opts)
    logfile = tmp_path / "verifier.log"
    with open(logfile, "wb") as log:
        proc: trio.Process = await nursery.start(partial(
            trio.run_process, [str(KEYTRIO), "verifier", "--config", str(conf)], stderr=log, check=False,
            env=clean_env()))
        started = await until(lambda: [ln for ln in logfile.read_text().splitlines()
                                       if "event=verifier.workers_started" in ln], "the workers start")
        fields = dict(f.split("=", 1) for f in started[0].split() if "=" in f)
        port = int(fields["https"].rsplit(":", 1)[1])
        metrics = [int(m.rsplit(":", 1)[1]) for m in fields["metrics"].split(",")]
        assert port != 0 and len(set(metrics)) == 2 and 0 not in metrics
        svc = Service(proc, f"https://127.0.0.1:{port}/v2.1", pki, pg_url)
        assert await svc.answers()
        workers = svc.workers()
        assert len(workers) == 2
        proc.kill()
        with trio.fail_after(GUARD):
            await proc.wait()
        await until(lambda: not any(state(p) for p in workers), "the orphaned workers stop")
    text = logfile.read_text()
    assert text.count("event=verifier.worker_orphaned") == 2, text
    assert text.count("event=verifier.stopped") == 2 and "Traceback" not in text, text
    svc.engine.dispose()



async def test_push_agent_attests_through_either_worker(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, pg_url: str  # noqa: F811
) -> None:
    """mode = push, workers = 2: the enrolment, the session and each cycle land on whichever worker
    the kernel gives the connection; with one worker stopped in turn, every cycle is served and
    judged by the other, and a file outside the policy still fails. (That the inline policy one
    worker accepted is loaded by the other before judging is shown deterministically by
    test_failover_push_e2e: here the policy refresh or the lease may have loaded it already.)"""
    opts = verifier_options(pki, tmp_path / "v", database_url=pg_url, workers=2, mode="push", verifier_id="wpush",
                   quote_interval=1.0, lease_ttl=4.0, database_pool_sz_ovfl="3,2")
    conf = write(tmp_path, "verifier", opts)
    log = open(tmp_path / "verifier.log", "wb")  # closed below
    proc: trio.Process = await nursery.start(partial(
        trio.run_process, [str(KEYTRIO), "verifier", "--config", str(conf)], stderr=log, check=False,
        env=clean_env()))
    svc = Service(proc, f"https://127.0.0.1:{opts['port']}/v2.1", pki, pg_url)
    try:
        workers = await until(lambda: len(w := svc.workers()) == 2 and w, "two workers")
        await until(svc.answers, "the port answers")
        r = await svc.request("POST", f"/agents/{PA}", push_enrol_body("rsa", policy_for(PATHS)))
        assert r.status_code == 200, r.text
        a = SoftAgent.make(PA, "rsa", "127.0.0.1", opts["port"], pki.ca, PATHS)
        for k in range(5):
            if k == 4:
                a.entries.append(push_entry("/tmp/evil"))  # measured, not in the policy
            held = workers[k % 2]
            with stopped(held):
                await until(partial(state_is, held, "T"), "the worker is stopped")
                await a.client.aclose()  # a new connection: it can only reach the running worker
                a.client = make_client(tls.client_context([pki.ca]), timeout=20.0)
                if k == 0:
                    assert (await a.open_session()).status_code == 200
                index, resp = await a.cycle()
                assert resp.status_code == 202, resp.text

                async def judged(index: int = index) -> dict[str, Any] | None:
                    got = await a.request("GET", f"/agents/{PA}/attestations/{index}")
                    assert got.status_code == 200, got.text
                    attrs = got.json()["data"]["attributes"]
                    return attrs if attrs["stage"] == "verification_complete" else None

                attrs = await until(judged, f"cycle {k} judged")
                assert attrs["evaluation"] == ("fail" if k == 4 else "pass"), attrs
            if k < 4:  # the verifier's pace (429 before it)
                await trio.sleep(resp.json()["meta"]["seconds_to_next_attestation"])
        await a.client.aclose()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(tmp_path / 'verifier.log').read_text()}") from None
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(GUARD):
        await proc.wait()
    log.close()
    text = (tmp_path / "verifier.log").read_text()
    assert proc.returncode == 0, text
    assert "ima.policy_missing" not in text and "Traceback" not in text, text
    svc.engine.dispose()
