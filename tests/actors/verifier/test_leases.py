"""Cluster mode (actors/verifier/leases.py) on a real PostgreSQL: verifier instances share agents.

Each instance has its own Store (own connection pool) on one database; instance C reaches it
through the testbed's TCP proxy, so "C loses the database" is a real cut. Time runs on a manual
MockClock: the test jumps it and drives each instance's renewal (``tick``) itself, while each
instance's fence runs as its own task, exactly as in a verifier. The monitors are a recording
MonitorSet stand-in shared by all instances: it notes which instance runs each agent's monitor
and records an overlap if a second one starts while the first still runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from keytrio.actors.common.config import ConfigError
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.config import load_config, resolve
from keytrio.actors.verifier.leases import Cluster
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.notify import Outbox, SignedNotice
from keytrio.actors.verifier.schema import agents as agents_table
from keytrio.actors.verifier.schema import leases
from keytrio.testbed.netproxy import NetProxy
from tests.actors.verifier.cluster_support import agent_row
from tests.actors.verifier_support import (
    Webhook,
    enrol,
    enrol_body,
    new_halves,
    start_test_agent,
    start_verifier,
)
from tests.pg import pg_admin_url, pg_url  # noqa: F401

VID = "cluster"
T0 = 1_800_000_000.0  # the hosts' wall clock at mock time 0 (they agree, as NTP keeps them)
TTL, RENEW = 9.0, 3.0
MARGIN = TTL / 5
AGENTS = [f"agent-{i:02d}" for i in range(10)]


def wall() -> float:
    # from worker threads too (the outbox reads its clock in the database thread)
    return T0 + CLOCK[0]()


CLOCK: list[Callable[[], float]] = [lambda: 0.0]


@pytest.fixture
def mock_wall(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """The manual MockClock, which wall() follows."""
    CLOCK[0] = mock_clock.current_time
    return mock_clock


class Polls:
    """Who runs each agent's monitor right now, across every instance."""

    def __init__(self) -> None:
        self.by_agent: dict[str, str] = {}
        self.overlaps: list[tuple[str, str, str]] = []
        self.started: dict[str, list[tuple[float, str]]] = {}  # agent -> [(mock time, instance)]


class RecordingMonitors:
    def __init__(self, name: str, polls: Polls) -> None:
        self.name, self.polls = name, polls
        self._running: set[str] = set()

    @property
    def running(self) -> set[str]:
        return set(self._running)

    def start(self, agent_id: str) -> None:
        other = self.polls.by_agent.get(agent_id)
        if other is not None and other != self.name:
            self.polls.overlaps.append((agent_id, other, self.name))
        self.polls.by_agent[agent_id] = self.name
        self.polls.started.setdefault(agent_id, []).append((trio.current_time(), self.name))
        self._running.add(agent_id)

    def stop(self, agent_id: str) -> None:
        self._running.discard(agent_id)
        if self.polls.by_agent.get(agent_id) == self.name:
            del self.polls.by_agent[agent_id]


async def holders(store: Store) -> dict[str, tuple[str | None, float]]:
    def q(conn: sa.Connection) -> dict[str, tuple[str | None, float]]:
        rows = conn.execute(sa.select(leases.c.name, leases.c.holder, leases.c.expires_at)
                            .where(leases.c.kind == "agent"))
        return {n: (h, e) for n, h, e in rows}

    return await store.read(q)


class Instance:
    def __init__(self, name: str, store: Store, polls: Polls, outbox: Callable[..., Any] | None = None) -> None:
        self.name, self.store = name, store
        self.monitors = RecordingMonitors(name, polls)
        self.outbox_runs = 0
        self.cluster = Cluster(store, verifier_id=VID, monitors=self.monitors, ttl=TTL, renew_interval=RENEW,
                               margin=MARGIN, clock=wall, instance_id=name,
                               outbox=outbox or self._outbox)

    async def _outbox(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.outbox_runs += 1
        await trio.sleep_forever()


def check(instances: list[Instance], polls: Polls) -> None:
    assert polls.overlaps == []
    held = [i.cluster.held for i in instances]
    for a in range(len(held)):
        for b in range(a + 1, len(held)):
            assert not held[a] & held[b], "two instances hold one lease"
    for i in instances:
        assert i.monitors.running <= i.cluster.held  # polls only what it holds


async def rounds(mock_clock: trio.testing.MockClock, live: list[Instance], n: int) -> None:
    for _ in range(n):
        mock_clock.jump(RENEW)
        await trio.testing.wait_all_tasks_blocked()
        for i in live:
            await i.cluster.tick()


async def test_three_share_one_cut_off_fenced_others_take_over_fourth_rebalances(
    nursery: trio.Nursery, mock_wall: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    mock_clock = mock_wall
    url = sa.engine.make_url(pg_url)
    proxy = NetProxy((url.host or "127.0.0.1", url.port or 5432))
    await nursery.start(proxy.run)
    stores = [await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2) for _ in range(2)]
    stores.append(await Store.open(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False),
                                   migrations=MIGRATIONS, pool_size=2))
    await stores[0].write(lambda conn: conn.execute(sa.insert(agents_table), [agent_row(a) for a in AGENTS]))
    polls = Polls()
    a, b, c = (Instance(n, s, polls) for n, s in zip("ABC", stores, strict=True))
    everyone = [a, b, c]
    for i in everyone:
        await nursery.start(i.cluster.guard)
    await c.cluster.tick()  # C first: it also takes the outbox lease
    for i in (a, b):
        await i.cluster.tick()
    await rounds(mock_clock, everyone, 3)
    check(everyone, polls)
    share = math.ceil(len(AGENTS) / 3)
    assert all(0 < len(i.cluster.held) <= share for i in everyone)
    assert set(polls.by_agent) == set(AGENTS)  # every agent polled, by one instance
    assert c.cluster.holds_outbox and c.outbox_runs == 1 and a.outbox_runs == b.outbox_runs == 0

    # C loses the database: its renewals fail; it stops polling before its leases expire
    c_agents = set(c.cluster.held)
    last_renewal = trio.current_time()
    proxy.set_mode("refuse")
    while trio.current_time() + RENEW < last_renewal + TTL - MARGIN:
        await rounds(mock_clock, [a, b], 1)
        with pytest.raises(sa.exc.OperationalError):
            await c.cluster.tick()
        assert c.monitors.running == c_agents  # still valid on C's own clock
        check(everyone, polls)
    mock_clock.jump(last_renewal + TTL - MARGIN - trio.current_time())
    await trio.testing.wait_all_tasks_blocked()
    assert c.monitors.running == set() and c.cluster.fenced == 1 and not c.cluster.holds_outbox
    rows = await holders(stores[0])
    assert {n for n, (h, _) in rows.items() if h == "C"} == c_agents
    assert all(exp > wall() for n, (h, exp) in rows.items() if h == "C")  # fenced before expiry

    # the others take C's agents within lease TTL + one renewal (<= one quote interval)
    while not c_agents <= set(polls.by_agent):
        assert trio.current_time() <= last_renewal + TTL + RENEW, "C's agents not taken over in time"
        await rounds(mock_clock, [a, b], 1)
    handover = max(t for aid in c_agents for t, who in polls.started[aid] if who != "C") - last_renewal
    assert TTL <= handover <= TTL + RENEW
    check(everyone, polls)
    assert set(polls.by_agent) == set(AGENTS) and a.cluster.held | b.cluster.held == set(AGENTS)
    assert (a.outbox_runs, b.outbox_runs) in ((1, 0), (0, 1))  # a survivor delivers the notices now

    # a fourth instance joins: the share rebalances to ceil(10 / 3) with no overlap on the way
    d = Instance("D", await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2), polls)
    await nursery.start(d.cluster.guard)
    live = [a, b, d]
    for _ in range(3):
        await d.cluster.tick()
        await rounds(mock_clock, [a, b], 1)
        check([*everyone, d], polls)
    assert all(len(i.cluster.held) <= math.ceil(len(AGENTS) / 3) for i in live)
    assert len(d.cluster.held) >= 2 and set(polls.by_agent) == set(AGENTS)

    nursery.cancel_scope.cancel()


async def test_dead_instance_pending_notice_is_delivered_by_a_survivor(
    nursery: trio.Nursery, mock_wall: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    mock_clock = mock_wall
    webhook = Webhook()
    await nursery.start(webhook.run)
    url = sa.engine.make_url(pg_url)
    proxy = NetProxy((url.host or "127.0.0.1", url.port or 5432))
    await nursery.start(proxy.run)
    store_c = await Store.open(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False),
                               migrations=MIGRATIONS, pool_size=2)
    store_s = await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2)
    polls = Polls()
    # C holds the outbox lease and stages a notice, but dies before its delivery attempt
    box_c = Outbox(store_c, verifier_id=VID, context_for=lambda row: None,  # type: ignore[arg-type,return-value]
                   webhook_url=webhook.url, clock=wall)
    box_s = Outbox(store_s, verifier_id=VID, context_for=lambda row: None,  # type: ignore[arg-type,return-value]
                   webhook_url=webhook.url, clock=wall)
    c = Instance("C", store_c, polls)  # its outbox runner never delivers (it is about to die)
    s = Instance("S", store_s, polls, outbox=box_s.run)
    c_scope = trio.CancelScope()

    async def run_c(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with c_scope:
            await c.cluster.guard(task_status=task_status)

    await nursery.start(run_c)
    await nursery.start(s.cluster.guard)
    await c.cluster.tick()
    await s.cluster.tick()
    c_renewed = trio.current_time()
    assert c.cluster.holds_outbox and c.outbox_runs == 1 and not s.cluster.holds_outbox
    await box_c.publish(SignedNotice("agent-00", "notice-1", "test.event", "{}", ""))
    assert sum((await box_s.pending_counts()).values()) == 1
    proxy.set_mode("refuse")  # C dies as with kill -9: no renewal, no goodbye
    c_scope.cancel()
    while not s.cluster.holds_outbox:
        assert trio.current_time() <= c_renewed + TTL + RENEW, "the outbox lease was not taken over"
        await rounds(mock_clock, [s], 1)
    assert trio.current_time() > c_renewed + TTL  # not before C's lease expired
    mock_clock.autojump_threshold = 5.0  # only a hang guard from here: 5 idle real seconds
    with trio.fail_after(60):
        for _ in range(1000):  # rounds, not seconds: the delivery is real I/O
            if not sum((await box_s.pending_counts()).values()):
                break
            await trio.testing.wait_all_tasks_blocked(0.01)
    assert [b["msg"] for b in webhook.bodies] == ["{}"] and webhook.bodies[0]["signature"] == ""


def test_cluster_needs_postgresql_in_any_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(load_config(overrides={"data_dir": str(tmp_path), "cluster": True, "database_url": ""}))
    assert "needs a PostgreSQL" in str(err.value)
    with pytest.raises(ConfigError) as err:  # push agents are leased too: any mode (other problems only)
        resolve(load_config(overrides={"data_dir": str(tmp_path), "cluster": True, "mode": "both",
                                       "database_url": "postgresql+psycopg://u@h/db"}))
    assert "cluster:" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # off by default: no such complaint
        resolve(load_config(overrides={"data_dir": str(tmp_path)}))
    assert "cluster:" not in str(err.value)


@pytest.mark.swtpm
async def test_cluster_verifiers_split_real_agents_and_take_over_on_stop(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm_factory: Any, pg_url: str  # noqa: F811
) -> None:
    agents = []
    for i in range(4):
        tpm = await swtpm_factory(fresh=False)
        agents.append(await start_test_agent(nursery, tmp_path / f"a{i}", pki, tpm.tcti, None))
    ids = {a.agent_id for a in agents}
    opts = {"database_url": pg_url, "quote_interval": 0.5, "database_pool_sz_ovfl": "3,2",
            "verifier_id": VID, "cluster": True, "lease_ttl": 3.0}
    va = await start_verifier(nursery, pki, tmp_path / "va", **opts)
    vb = await start_verifier(nursery, pki, tmp_path / "vb", **opts)
    for i, agent in enumerate(agents):  # through either: the lease holders poll them
        await enrol(va if i % 2 else vb, agent.agent_id, enrol_body(agent, v=new_halves().v))
    ma, mb = va.verifier.monitors, vb.verifier.monitors
    assert ma is not None and mb is not None
    with trio.fail_after(60):  # a hang guard: the shares settle at the next ticks
        while not (len(ma.running) == len(mb.running) == 2 and ma.running | mb.running == ids):
            await trio.sleep(0.1)
    assert not ma.running & mb.running
    for agent in agents:
        await va.wait(agent.agent_id, lambda r: r["attestation_count"] >= 2)
    a_agents = set(ma.running)
    counts = {aid: (await vb.get(aid))["attestation_count"] for aid in a_agents}
    await va.stop()  # a clean stop gives A's leases back: B polls them from its next tick on
    for aid in a_agents:
        rec = await vb.wait(aid, lambda r, aid=aid: r["attestation_count"] >= counts[aid] + 2)
        assert rec["operational_state"] == records.GET_QUOTE
    assert mb.running == ids
    await vb.stop()


async def test_hung_database_fences_then_the_instance_rejoins(
    nursery: trio.Nursery, mock_wall: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    mock_clock = mock_wall
    url = sa.engine.make_url(pg_url)
    proxy = NetProxy((url.host or "127.0.0.1", url.port or 5432))
    await nursery.start(proxy.run)
    store_a = await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2)
    store_c = await Store.open(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False),
                               migrations=MIGRATIONS, pool_size=2)
    await store_a.write(lambda conn: conn.execute(sa.insert(agents_table), [agent_row(a) for a in AGENTS]))
    polls = Polls()
    a, c = Instance("A", store_a, polls), Instance("C", store_c, polls)
    for i in (a, c):
        await nursery.start(i.cluster.guard)
        await i.cluster.tick()
    await rounds(mock_clock, [a, c], 2)
    check([a, c], polls)
    assert len(a.cluster.held) == len(c.cluster.held) == 5
    c_agents, last_renewal = set(c.cluster.held), trio.current_time()

    # the database stops answering C (no reset: its renewal hangs in its thread)
    proxy.set_mode("blackhole")
    hung = trio.Event()

    async def hanging_tick() -> None:
        try:
            await c.cluster.tick()
        except sa.exc.OperationalError:
            pass
        hung.set()

    nursery.start_soon(hanging_tick)
    mock_clock.jump(last_renewal + TTL - MARGIN - trio.current_time())
    await trio.testing.wait_all_tasks_blocked()
    assert not hung.is_set()  # still waiting on the database...
    assert c.monitors.running == set() and c.cluster.fenced == 1  # ...and no longer polling
    while not c_agents <= a.monitors.running:
        assert trio.current_time() <= last_renewal + TTL + RENEW
        await rounds(mock_clock, [a], 1)
    check([a, c], polls)

    # the connection breaks, the database is back: C rejoins and gets its share again
    proxy.set_mode("refuse")
    await hung.wait()
    proxy.set_mode("pass")
    for _ in range(3):
        await c.cluster.tick()
        await rounds(mock_clock, [a], 1)
        check([a, c], polls)
    assert len(a.cluster.held) == len(c.cluster.held) == 5 and set(polls.by_agent) == set(AGENTS)
