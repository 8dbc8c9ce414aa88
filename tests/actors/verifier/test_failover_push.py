"""Push agents under leases (leases.PushTimers) on a real PostgreSQL: only the lease holder runs an
agent's liveness deadline, evidence recorded by any instance keeps it alive, and a dead holder's
push agents get their deadline on a survivor. Two cluster instances share one database; time runs
on a manual MockClock (the hosts' wall clock follows it). The timeout is push/verify.py's own
``Verifier.timed_out`` (failure, state and notice in one fenced transaction); the notifier records
which instance staged a notice.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import trio
import trio.testing

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.leases import Cluster, PushTimers
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.push.timer import Deadlines
from keytrio.actors.verifier.push.verify import TIMEOUT, Verifier
from keytrio.actors.verifier.schema import agents as agents_table
from tests.actors.verifier.cluster_support import TaskMonitors, agent_row
from tests.pg import pg_admin_url, pg_url  # noqa: F401

VID = "cluster"
TTL, RENEW, MARGIN = 9.0, 3.0, 1.8
MAX_INTERVAL = 10.0
T0 = 1_800_000_000.0
AID = "push-00"


class Notices:
    def __init__(self) -> None:
        self.committed: list[tuple[str, str]] = []  # (instance, agent)

    def for_instance(self, name: str) -> Any:
        notices = self

        class Notifier:
            def stage(self, conn: sa.Connection, notice: Any, now: float) -> None:
                pass

            def committed(self, notice: Any) -> None:
                notices.committed.append((name, notice.agent_id))

        return Notifier()


class Instance:
    def __init__(self, name: str, store: Store, nursery: trio.Nursery, notices: Notices, wall: Any) -> None:
        self.service_deadlines = Deadlines(nursery, self._service_expired)  # the PushService's own
        self.verifier = Verifier(store, notifier=notices.for_instance(name), ima_check_for=None, clock=wall,
                                 session_lifetime=60.0, max_interval=MAX_INTERVAL)
        self.timers = PushTimers(store, nursery, service_deadlines=self.service_deadlines,
                                 max_interval=MAX_INTERVAL, timed_out=self._timed_out, clock=wall)
        self.timed_out_done = trio.Event()
        self.cluster = Cluster(store, verifier_id=VID, monitors=TaskMonitors(nursery), push=self.timers, ttl=TTL,
                               renew_interval=RENEW, margin=MARGIN, clock=wall, instance_id=name)

    async def _timed_out(self, agent_id: str) -> None:
        try:
            await self.verifier.timed_out(agent_id)
        finally:  # its transaction ran in a thread: the test waits for this, not for idleness
            self.timed_out_done.set()

    async def _service_expired(self, agent_id: str) -> None:
        raise AssertionError("the service's own deadline must never run in cluster mode")


async def test_only_the_holder_times_out_a_push_agent_and_a_survivor_takes_over(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    def wall() -> float:
        return T0 + mock_clock.current_time()

    stores = [await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2) for _ in range(2)]
    row = {**agent_row(AID), "ip": None, "port": None}
    await stores[0].write(lambda conn: conn.execute(sa.insert(agents_table), [row]))
    notices = Notices()
    a, b = (Instance(n, s, nursery, notices, wall) for n, s in zip("AB", stores, strict=True))
    await a.cluster.tick()
    await b.cluster.tick()
    assert a.timers.running == {AID} and a.timers.deadlines.armed == {AID}
    assert b.timers.running == set() and b.timers.deadlines.armed == set()
    assert a.cluster.monitors.running == set()  # a push agent gets no polling monitor
    # evidence arriving at either instance arms nothing in the service (gated shut)
    a.service_deadlines.arm(AID, 1.0)
    b.service_deadlines.arm(AID, 1.0)
    assert a.service_deadlines.armed == b.service_deadlines.armed == set()

    async def advance(seconds: float, *live: Instance) -> None:
        end = mock_clock.current_time() + seconds
        while mock_clock.current_time() < end:
            mock_clock.jump(min(RENEW, end - mock_clock.current_time()))
            await trio.testing.wait_all_tasks_blocked()
            for i in live:
                await i.cluster.tick()
            await trio.testing.wait_all_tasks_blocked()

    # the agent keeps attesting (recorded by whichever instance it reached): never failed
    for _ in range(4):
        await advance(6.0, a, b)
        await records.update(stores[1], AID, last_received_quote=int(wall()))  # as push/verify.py writes it
    assert notices.committed == [] and not a.timed_out_done.is_set() and not b.timed_out_done.is_set()
    rec = await records.get(stores[0], AID)
    assert rec is not None and rec["operational_state"] == records.GET_QUOTE

    # A dies (kill -9: no renewal, no goodbye); B claims after the lease TTL and arms the deadline
    a_scope_stop = set(a.timers.running)
    for aid in a_scope_stop:
        a.timers.stop(aid)  # the process is gone: its timers with it
    died = mock_clock.current_time()
    while AID not in b.timers.running:
        assert mock_clock.current_time() <= died + TTL + RENEW, "B did not take the push agent over"
        await advance(RENEW, b)
    assert b.timers.deadlines.armed == {AID}

    # the agent goes silent: B (only B) fails it once, a full max_interval after its last evidence
    await advance(MAX_INTERVAL + 2 * RENEW, b)
    assert b.timers.deadlines.armed == set()  # it fired (an entry goes before on_expired runs)
    await b.timed_out_done.wait()
    rec = await records.get(stores[0], AID)
    assert rec is not None
    assert (rec["operational_state"], rec["last_event_id"]) == (records.FAILED, TIMEOUT)
    assert notices.committed == [("B", AID)]
    await advance(2 * RENEW, b)
    assert b.timers.running == set() and notices.committed == [("B", AID)]


async def test_a_holder_that_lost_the_lease_cannot_time_out_the_agent(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    """A paused holder whose deadline fires after another instance claimed the agent writes
    nothing and notifies no one (its timeout is fenced by its claim's epoch)."""

    def wall() -> float:
        return T0 + mock_clock.current_time()

    stores = [await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2) for _ in range(2)]
    row = {**agent_row(AID), "ip": None, "port": None}
    await stores[0].write(lambda conn: conn.execute(sa.insert(agents_table), [row]))
    notices = Notices()
    a, b = (Instance(n, s, nursery, notices, wall) for n, s in zip("AB", stores, strict=True))
    await a.cluster.tick()
    # A is paused past its lease (no renewal); B claims; B hears from the agent just now
    mock_clock.jump(TTL + 0.5)
    await b.cluster.tick()
    assert b.timers.running == {AID}
    await records.update(stores[1], AID, last_received_quote=int(wall()))
    b.timers.stop(AID)  # only A's stale deadline may act in this test
    # A's stale deadline fires, past the agent's last evidence + max_interval (its fence task does
    # not run in this test, as in a paused process): its timeout is fenced
    mock_clock.jump(MAX_INTERVAL + 1.5)
    await trio.testing.wait_all_tasks_blocked()
    assert a.timers.deadlines.armed == set()  # fired, and no evidence to re-arm it for
    await a.timed_out_done.wait()
    rec = await records.get(stores[0], AID)
    assert rec is not None and rec["operational_state"] == records.GET_QUOTE
    assert notices.committed == []
