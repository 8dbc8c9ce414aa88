"""A verifier cluster for the testbed: N real ``keytrio verifier`` processes on one PostgreSQL.

- :func:`ensure_postgres` / :func:`fresh_database`: a PostgreSQL server (the local Debian cluster
  is started when it is down and we are root, as the tests' fixture does; ``./scripts/setup``
  installs it) and one new database per run, dropped afterwards.
- :class:`VerifierCluster`: starts verifier processes (same ``verifier_id``, ``cluster = true``,
  the testbed's CA and certificates), each reaching the database through its own
  :class:`~testbed.netproxy.NetProxy`, so one can be cut from the database (``cut``) while the
  others are not; ``kill`` is ``kill -9``. Every process logs to ``<dir>/<name>.log``.
- :class:`Watch`: samples the shared database every ``interval`` seconds (each agent's
  ``attestation_count`` and lease holder) and each process's poll counter (its metrics
  endpoint), and turns the samples into the figures of a hand-over: per agent, the last poll
  of the instance that went away and the first poll by the one that took over.

Times are this host's wall clock (``time.time``), the clock the leases' ``expires_at`` use.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio

from keytrio.actors.tenant import Tenant
from keytrio.actors.verifier.schema import agents, leases
from keytrio.testbed.netproxy import Mode, NetProxy
from keytrio.testbed.pki import CaFiles
from keytrio.testbed.postgres import PostgresUnavailable, drop_database, find_server
from keytrio.testbed.world import POLL, Testbed

STARTED = re.compile(r"event=verifier\.started .*https=([\d.]+):(\d+) metrics=([\d.]+):(\d+)")
JOINED = re.compile(r"event=cluster\.joined instance=([0-9a-f]+)")
POLLS_OK = re.compile(r'^keytrio_verifier_polls_total\{result="ok"\} ([0-9.e+]+)$', re.M)


class ClusterError(Exception):
    """The cluster could not be set up (no PostgreSQL, a verifier that did not start)."""


# --- PostgreSQL ------------------------------------------------------------------------------------

def ensure_postgres(url: str | None = None) -> str:
    """An admin URL (may create databases) of a reachable server (testbed.postgres.find_server)."""
    try:
        return find_server(url)
    except PostgresUnavailable as exc:
        raise ClusterError(str(exc)) from None


@asynccontextmanager
async def fresh_database(admin_url: str | None = None) -> AsyncIterator[str]:
    """A new empty database for one run (its URL); dropped afterwards."""
    admin = await trio.to_thread.run_sync(ensure_postgres, admin_url)
    name = f"keytrio_cluster_{uuid.uuid4().hex[:12]}"

    def admin_sql(sql: str) -> None:
        engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(sql))
        finally:
            engine.dispose()

    await trio.to_thread.run_sync(admin_sql, f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(drop_database, admin, name)


# --- the verifier processes -----------------------------------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string (JSON's escapes are TOML's)


@dataclass
class VerifierProcess:
    name: str
    dir: Path
    proxy: NetProxy
    process: trio.Process | None = None
    address: tuple[str, int] | None = None
    metrics_address: tuple[str, int] | None = None
    instance_id: str = ""
    killed_at: float | None = None

    @property
    def log(self) -> Path:
        return self.dir.parent / f"{self.name}.log"

    @property
    def url(self) -> str:
        assert self.address is not None
        return "https://{}:{}".format(*self.address)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class VerifierCluster:
    """``async with VerifierCluster(...) as cluster``: start/kill/cut verifier processes."""

    dir: Path
    ca: CaFiles
    database_url: str
    verifier_id: str = "cluster"
    lease_ttl: float = 3.0
    quote_interval: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    members: dict[str, VerifierProcess] = field(default_factory=dict)
    _nursery: trio.Nursery | None = None
    _cm: Any = None

    async def __aenter__(self) -> VerifierCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        with trio.CancelScope(shield=True):
            for m in self.members.values():
                if m.alive:
                    await self.stop(m.name)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._cm.__aexit__(*exc)

    def _config(self, m: VerifierProcess) -> Path:
        url = sa.engine.make_url(self.database_url)
        via_proxy = url.set(host="127.0.0.1", port=m.proxy.port).render_as_string(hide_password=False)
        ca = self.ca
        # workers = 1: one process is one cluster instance (kill -9 takes exactly one instance away)
        values: dict[str, Any] = {
            "ip": "127.0.0.1", "port": 0, "metrics_ip": "127.0.0.1", "metrics_port": 0,
            "data_dir": str(m.dir), "database_url": via_proxy, "database_pool_sz_ovfl": "4,2",
            "verifier_id": self.verifier_id, "cluster": True, "lease_ttl": self.lease_ttl, "workers": 1,
            "quote_interval": self.quote_interval, "retry_interval": 0.2, "max_retries": 100,
            "request_timeout": 2.0, "exponential_backoff": False, "graceful_timeout": 0.5,
            "server_cert": str(ca.server_cert), "server_key": str(ca.server_key),
            "client_cert": str(ca.client_cert), "client_key": str(ca.client_key),
            "trusted_client_ca": [str(ca.ca)], "trusted_server_ca": [str(ca.ca)],
            **self.options,
        }
        path = m.dir / "verifier.toml"
        path.write_text("[verifier]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()))
        return path

    async def start(self, name: str | None = None, *, timeout: float = 60.0) -> VerifierProcess:
        """Start one more verifier process; returns once it serves (its API and metrics bound)."""
        assert self._nursery is not None
        name = name or f"v{len(self.members)}"
        url = sa.engine.make_url(self.database_url)
        proxy = NetProxy((url.host or "127.0.0.1", url.port or 5432))
        await self._nursery.start(proxy.run)
        m = VerifierProcess(name=name, dir=self.dir / name, proxy=proxy)
        m.dir.mkdir(parents=True, exist_ok=True)
        config = self._config(m)
        log = m.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            m.process = await self._nursery.start(partial(
                trio.run_process, [sys.executable, "-m", "keytrio", "verifier", "--config", str(config)],
                check=False, stdout=log, stderr=subprocess.STDOUT, env=env))
        finally:
            log.close()
        self.members[name] = m
        with trio.move_on_after(timeout):
            while True:
                text = m.log.read_text(errors="replace")
                started, joined = STARTED.search(text), JOINED.search(text)
                if started and joined:
                    m.address = (started[1], int(started[2]))
                    m.metrics_address = (started[3], int(started[4]))
                    m.instance_id = joined[1]
                    return m
                if not m.alive:
                    break
                await trio.sleep(0.05)
        raise ClusterError(f"verifier {name} did not start (see {m.log}):\n{m.log.read_text()[-2000:]}")

    def kill(self, name: str) -> float:
        """``kill -9``: no goodbye, its leases expire on their own; when (wall clock)."""
        m = self.members[name]
        assert m.process is not None
        m.process.send_signal(signal.SIGKILL)
        m.killed_at = time.time()
        return m.killed_at

    async def stop(self, name: str) -> None:
        """A clean stop (SIGTERM): it gives its leases back."""
        m = self.members[name]
        if m.process is None or m.process.returncode is not None:
            return
        m.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            await m.process.wait()
        if m.process.returncode is None:
            m.process.kill()
            await m.process.wait()

    def cut(self, name: str, mode: Mode = "blackhole") -> float:
        """Cut ``name`` from the database (``refuse``: resets; ``blackhole``: silence); when."""
        self.members[name].proxy.set_mode(mode)
        return time.time()

    def fenced_at(self, name: str, after: float) -> float | None:
        """When ``name`` logged that its fence fired (leases unrenewed, monitors stopped) after
        ``after``; None if it did not. Log times are this host's local time (logging's asctime)."""
        for line in self.members[name].log.read_text(errors="replace").splitlines():
            if "event=cluster.fenced" in line and "why=lease_unrenewed" in line:
                at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at > after:
                    return at
        return None

    def by_instance(self) -> dict[str, str]:
        return {m.instance_id: m.name for m in self.members.values()}


async def use_verifier(tb: Testbed, url: str) -> None:
    """Point the testbed's tenant at one of the cluster's verifiers (any of them shows every agent)."""
    assert tb.tenant is not None and tb.ca is not None
    await tb.tenant.aclose()
    tb.tenant = Tenant(tb.registrar_url, url, ca_files=[tb.ca.ca], client_cert=tb.ca.client_cert,
                       client_key=tb.ca.client_key, request_timeout=10.0, poll_interval=POLL)


# --- watching the cluster -------------------------------------------------------------------------

@dataclass
class Sample:
    t: float
    counts: dict[str, int]
    holders: dict[str, str | None]  # agent -> holder instance
    expires: dict[str, float]  # agent -> lease expires_at (wall clock)
    outbox: str | None = None  # the instance delivering the revocation notices


@dataclass
class Handover:
    """Per agent of the instance that went away: its last poll and the survivor's first one."""

    agents: dict[str, tuple[float, float, str]]  # agent -> (last poll by it, first by a survivor, survivor)
    at: float  # the kill or cut (wall clock)

    @property
    def seconds(self) -> float:
        """max over its agents of (first successful poll by a survivor - last poll by it)."""
        return max((first - last for last, first, _ in self.agents.values()), default=0.0)

    def gap(self, skip: frozenset[str] = frozenset()) -> float | None:
        """:attr:`seconds` over its agents but ``skip`` (None: no agent left)."""
        gaps = [first - last for a, (last, first, _) in self.agents.items() if a not in skip]
        return max(gaps) if gaps else None

    @property
    def after_event(self) -> float:
        """max over its agents of (first successful poll by a survivor - the kill/cut)."""
        return max((first - self.at for _, first, _ in self.agents.values()), default=0.0)


class Watch:
    """Samples the database (and the verifiers' poll counters) until cancelled."""

    def __init__(self, database_url: str, cluster: VerifierCluster, *, interval: float = 0.1) -> None:
        self.database_url = database_url
        self.cluster = cluster
        self.interval = interval
        self.samples: list[Sample] = []
        #: process name -> [(wall time, ok polls so far)] while its metrics endpoint answers
        self.polls: dict[str, list[tuple[float, float]]] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        engine = sa.create_engine(self.database_url, pool_size=1)
        try:
            async with httpx.AsyncClient(timeout=1.0) as http:
                await self._sample(engine, http)
                task_status.started()
                while True:
                    await trio.sleep(self.interval)
                    await self._sample(engine, http)
        finally:
            engine.dispose()

    async def _sample(self, engine: sa.Engine, http: httpx.AsyncClient) -> None:
        vid = self.cluster.verifier_id

        def q() -> Sample:
            with engine.connect() as conn:
                counts = {a: int(c) for a, c in conn.execute(
                    sa.select(agents.c.agent_id, agents.c.attestation_count).where(agents.c.verifier_id == vid))}
                rows = conn.execute(sa.select(leases.c.kind, leases.c.name, leases.c.holder, leases.c.expires_at)
                                    .where(leases.c.verifier_id == vid)).all()
            mine = [(n, h, e) for k, n, h, e in rows if k == "agent"]
            outbox = next((h for k, _, h, _ in rows if k == "outbox"), None)
            return Sample(time.time(), counts, {n: h for n, h, _ in mine}, {n: float(e) for n, _, e in mine}, outbox)

        self.samples.append(await trio.to_thread.run_sync(q))
        for m in list(self.cluster.members.values()):
            if not m.alive or m.metrics_address is None:
                continue
            try:
                text = (await http.get("http://{}:{}/metrics".format(*m.metrics_address))).text
            except httpx.HTTPError:
                continue
            found = POLLS_OK.search(text)
            if found:
                self.polls.setdefault(m.name, []).append((time.time(), float(found[1])))

    def latest(self) -> Sample:
        return self.samples[-1]

    def held_by(self, instance: str, before: float) -> set[str]:
        """The agents whose lease ``instance`` held in the last sample before ``before``."""
        last = [s for s in self.samples if s.t <= before][-1]
        return {a for a, h in last.holders.items() if h == instance}

    def increments(self, agent: str) -> list[tuple[float, str | None]]:
        """(sample time, holder then) of every sample in which ``agent``'s count grew."""
        out: list[tuple[float, str | None]] = []
        for prev, cur in itertools.pairwise(self.samples):
            if cur.counts.get(agent, 0) > prev.counts.get(agent, 0):
                out.append((cur.t, cur.holders.get(agent)))
        return out

    def handover(self, instance: str, at: float, skip: frozenset[str] = frozenset()) -> Handover | None:
        """The hand-over of ``instance``'s agents after ``at`` (but ``skip``: agents that could not
        be attested before, whose last poll says nothing about the hand-over); None until every
        one of them was attested by another instance."""
        result: dict[str, tuple[float, float, str]] = {}
        for agent in self.held_by(instance, at) - skip:
            incs = self.increments(agent)
            before = [t for t, h in incs if t <= at and h == instance]
            after = [(t, h) for t, h in incs if t > at and h is not None and h != instance]
            if not after:
                return None
            result[agent] = (before[-1] if before else at, after[0][0], after[0][1] or "")
        return Handover(result, at)

    def last_poll(self, name: str) -> float | None:
        """When ``name``'s ok-poll counter last grew (as sampled), None if never seen."""
        series = self.polls.get(name, [])
        last = None
        for (_, a), (t, b) in itertools.pairwise(series):
            if b > a:
                last = t
        return last

    def polls_after(self, name: str, t: float) -> float:
        """How many ok polls ``name`` completed after ``t`` (as sampled)."""
        series = self.polls.get(name, [])
        before = [v for s, v in series if s <= t]
        return series[-1][1] - before[-1] if series and before else 0.0
