"""A monitor's success record handed to the group committer without waiting (monitor.py
``_hand_over`` / ``_collect``), on real SQLite and PostgreSQL with trio's MockClock.

The monitor's steady-state poll queues its record and sleeps; these tests drive the same Monitor
methods the poll loop uses with a queued record and then do what can happen before it is
collected: a stop, a reactivate, a tenant's state change, a failure of the same agent, a store
error in the group, a lease claimed by another instance (fence). The poll loop itself on real
agents is in test_verifier_monitor.py, test_durability.py and tests/test_bench_sim.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.monitor import (
    ACTIVE_STATES,
    COMM_ERROR,
    Monitor,
    MonitorSet,
    MonitorSettings,
    _Ended,
)
from keytrio.actors.verifier.schema import agents, leases
from keytrio.protocol.quote import ClockInfo
from tests.actors.verifier.cluster_support import VID, agent_row
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401


class RecordingNotifier:
    """The notifier's two calls: staging (nothing to deliver here) and the committed notices."""

    def __init__(self) -> None:
        self.committed_ids: list[str] = []

    def stage(self, conn: sa.Connection, notice: Any, now: float) -> None:
        pass

    def committed(self, notice: Any) -> None:
        self.committed_ids.append(notice.agent_id)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:  # noqa: F811
    s = await Store.open(db_url, migrations=MIGRATIONS, pool_size=3)
    await s.write(lambda c: c.execute(sa.insert(agents), [agent_row("a1"), agent_row("a2")]))
    try:
        yield s
    finally:
        await s.close()


def _monitors(store: Store, nursery: trio.Nursery) -> MonitorSet:
    notifier = RecordingNotifier()
    return MonitorSet(store, nursery=nursery, settings=MonitorSettings(write_linger=0.25),
                      context_for=lambda row: None, notifier=notifier)  # type: ignore[arg-type]


def _queue(ms: MonitorSet, agent_id: str, **values: Any) -> Monitor:
    """A monitor of ``agent_id`` right after a steady-state poll: its record queued, not collected."""
    monitor = Monitor(ms, agent_id)
    monitor.db_state = records.GET_QUOTE
    monitor._hand_over(records.submit_success(
        ms.store, agent_id, nursery=ms.nursery, now=1_700_000_000.0, only_in_states=ACTIVE_STATES,
        clock_info=ClockInfo(5000, 1, 2, 1), **{"next_ima_ml_entry": 77, **values}))
    return monitor


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Stands still unless a test jumps it: a queued record's group starts only after the test's
    own writes (the committer's linger ends when the test says so)."""
    return trio.testing.MockClock()


async def settle(store: Store, clock: trio.testing.MockClock) -> None:
    """Let the linger end, then wait (in real time: the group runs in a worker thread) until no
    group is queued or running."""
    while store._queue or store._busy or store._committing:
        clock.jump(1)  # again each time: the committer may start its linger after a jump
        await trio.to_thread.run_sync(time.sleep, 0.002)


async def _row(store: Store, agent_id: str = "a1") -> dict[str, Any] | None:
    return await records.get(store, agent_id)


async def test_the_record_of_every_poll_reaches_the_row_and_is_collected_without_a_checkpoint(
    store: Store, clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        for n in range(1, 6):
            monitor = _queue(ms, "a1", next_ima_ml_entry=n)
            assert monitor.queued is not None and not monitor.queued.done
            await settle(store, clock)
            with trio.testing.assert_no_checkpoints():
                await monitor._collect()
            assert monitor.queued is None and "a1" not in ms._queued
            row = await _row(store)
            assert row is not None and row["attestation_count"] == n and row["next_ima_ml_entry"] == n


async def test_a_stop_then_reactivate_while_queued_leaves_the_reset(
    store: Store, clock: trio.testing.MockClock
) -> None:
    """stop() takes the record back at once: it cannot land after reactivate's reset."""
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        monitor = _queue(ms, "a1")
        ms.stop("a1")
        assert await records.reactivate(store, "a1")
        await settle(store, clock)
        row = await _row(store)
        assert row is not None
        assert row["attestation_count"] == 0 and row["next_ima_ml_entry"] == 0 and row["tpm_clock_info"] is None
        with pytest.raises(_Ended):
            await monitor._collect()


@pytest.mark.parametrize("action", ["stop", "delete", "failed"])
async def test_a_tenant_action_before_the_group_runs_ends_the_monitor(
    store: Store, clock: trio.testing.MockClock, action: str
) -> None:
    """The route's write commits first (the monitor not stopped here yet, as on another instance):
    the guarded UPDATE refuses, the count stays, the monitor ends at its next collect."""
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        monitor = _queue(ms, "a1")
        other = _queue(ms, "a2")
        if action == "delete":
            assert await records.delete(store, "a1")
        else:
            assert await records.set_state(store, "a1", records.TERMINATED if action == "stop" else records.FAILED)
        await settle(store, clock)
        with pytest.raises(_Ended):
            await monitor._collect()
        row = await _row(store)
        assert row is None if action == "delete" else row is not None and row["attestation_count"] == 0
        await other._collect()  # the other agent's record in the same group was written
        row2 = await _row(store, "a2")
        assert row2 is not None and row2["attestation_count"] == 1


async def test_a_failure_right_after_a_queued_success_lands_after_it(
    store: Store, clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        monitor = _queue(ms, "a1")
        record = monitor.queued
        assert record is not None

        async def linger_ends_once_waited_for() -> None:
            # the clock stands: the group runs only once the monitor waits for it (or settle()
            # below jumps it), so a failure written without waiting would land first
            while not record.done:
                if record.waiting:
                    clock.jump(1)  # again each time: the committer may start lingering after a jump
                await trio.to_thread.run_sync(time.sleep, 0.002)

        nursery.start_soon(linger_ends_once_waited_for)
        with pytest.raises(_Ended):
            await monitor._fail_now(COMM_ERROR, RuntimeError("gone"), attempts=3)
        await settle(store, clock)
        row = await _row(store)
        assert row is not None
        assert row["attestation_count"] == 1 and row["next_ima_ml_entry"] == 77  # the success first
        assert row["operational_state"] == records.FAILED and row["last_event_id"] == COMM_ERROR
        assert ms.notifier.committed_ids == ["a1"]  # type: ignore[attr-defined]


async def test_a_state_change_right_after_a_queued_success_lands_after_it(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        monitor = _queue(ms, "a1", next_ima_ml_entry=5)
        await monitor._set_state(records.GET_QUOTE_RETRY, next_ima_ml_entry=9)
        row = await _row(store)
        assert row is not None and row["attestation_count"] == 1
        assert row["operational_state"] == records.GET_QUOTE_RETRY and row["next_ima_ml_entry"] == 9


async def test_a_store_error_in_the_group_reaches_its_monitor_only(
    store: Store, clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        bad = _queue(ms, "a1", boottime=2**70)  # no 64-bit integer: the driver refuses it
        good = _queue(ms, "a2")
        await settle(store, clock)
        with pytest.raises(Exception) as caught:
            await bad._collect()
        assert not isinstance(caught.value, _Ended)
        await good._collect()
        row, row2 = await _row(store), await _row(store, "a2")
        assert row is not None and row["attestation_count"] == 0
        assert row2 is not None and row2["attestation_count"] == 1


async def test_a_cancelled_monitor_drops_a_record_not_started_and_completes_a_started_one(
    store: Store, clock: trio.testing.MockClock
) -> None:
    """As a cancelled write_grouped: the poll loop's finally (reached here through run's cleanup
    code, the same statements) drops a queued record, waits for one whose group started."""
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        monitor = _queue(ms, "a1")
        record = monitor.queued
        assert record is not None
        with trio.CancelScope() as scope:
            scope.cancel()
            ms.stop("a1")  # the MonitorSet's own stop: dropped at once
            with pytest.raises(_Ended):
                await monitor._collect()
        assert record.done
        await settle(store, clock)
        row = await _row(store)
        assert row is not None and row["attestation_count"] == 0

        # started: the group already in the worker thread when the stop comes
        monitor = _queue(ms, "a1")
        record = monitor.queued
        assert record is not None
        while record in store._queue:
            clock.jump(1)
            await trio.to_thread.run_sync(time.sleep, 0.002)
        ms.stop("a1")  # too late to take back: it completes
        await settle(store, clock)
        row = await _row(store)
        assert row is not None and row["attestation_count"] == 1


async def test_a_fenced_record_queued_before_another_instance_claims_is_not_written(
    store: Store, clock: trio.testing.MockClock
) -> None:
    await store.write(lambda c: c.execute(sa.insert(leases), [
        {"kind": "agent", "name": "a1", "verifier_id": VID, "holder": "me", "expires_at": 1e12, "epoch": 1}]))
    async with trio.open_nursery() as nursery:
        ms = _monitors(store, nursery)
        with records.fenced(records.Fence("me", 1)):
            monitor = _queue(ms, "a1")
        # another instance claims the agent (a new epoch) before the group runs
        await store.write(lambda c: c.execute(sa.update(leases).where(leases.c.name == "a1")
                                              .values(holder="other", epoch=2)))
        await settle(store, clock)
        with pytest.raises(_Ended):
            await monitor._collect()
        row = await _row(store)
        assert row is not None and row["attestation_count"] == 0 and row["next_ima_ml_entry"] == 0
        # under the claim it holds, the same queued write lands
        with records.fenced(records.Fence("other", 2)):
            monitor = _queue(ms, "a1")
        await settle(store, clock)
        await monitor._collect()
        row = await _row(store)
        assert row is not None and row["attestation_count"] == 1
