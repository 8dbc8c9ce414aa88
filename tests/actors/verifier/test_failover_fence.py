"""Epoch-fenced writes in cluster mode (records.py + leases.py) on a real PostgreSQL.

A monitor started by the cluster runs under the fence of its claim (holder, epoch); its writes
must apply only while that claim stands. The "monitors" here start a real task per agent through
a nursery, as MonitorSet does, so the fence reaches the writes the same way (the task inherits the
cluster's context). Time runs on a manual MockClock; the hosts' wall clock follows it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import trio
import trio.testing

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.leases import Cluster
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.schema import agents as agents_table
from tests.actors.verifier.cluster_support import TaskMonitors, agent_row
from tests.pg import pg_admin_url, pg_url  # noqa: F401

VID = "cluster"
TTL, RENEW, MARGIN = 9.0, 3.0, 1.8
T0 = 1_800_000_000.0


async def count(store: Store, agent_id: str) -> int:
    row = await records.get(store, agent_id)
    assert row is not None
    return int(row["attestation_count"])


async def test_a_paused_holder_cannot_write_once_another_claimed(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    def wall() -> float:
        return T0 + mock_clock.current_time()

    sa_, sb = [await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2) for _ in range(2)]
    await sa_.write(lambda conn: conn.execute(sa.insert(agents_table), [agent_row("agent-00")]))
    ma, mb = TaskMonitors(nursery), TaskMonitors(nursery)
    a = Cluster(sa_, verifier_id=VID, monitors=ma, ttl=TTL, renew_interval=RENEW, margin=MARGIN,
                clock=wall, instance_id="A")
    b = Cluster(sb, verifier_id=VID, monitors=mb, ttl=TTL, renew_interval=RENEW, margin=MARGIN,
                clock=wall, instance_id="B")
    await a.tick()
    await trio.testing.wait_all_tasks_blocked()
    fence_a = ma.fences["agent-00"]
    assert fence_a == records.Fence("A", 1)  # the monitor's task inherited A's claim

    async def write_as(fence: records.Fence | None, **kw: Any) -> bool:
        with records.fenced(fence):
            return await records.record_success(sa_, "agent-00", now=wall(), only_in_states=[records.GET_QUOTE],
                                                **kw)

    assert await write_as(fence_a, next_ima_ml_entry=50)
    assert await count(sa_, "agent-00") == 1

    # A pauses (no renewal, no fence task running here): its lease expires and B claims it
    mock_clock.jump(TTL + 0.1)
    await b.tick()
    await trio.testing.wait_all_tasks_blocked()
    fence_b = mb.fences["agent-00"]
    assert fence_b == records.Fence("B", 2)
    assert await write_as(fence_b, next_ima_ml_entry=60)

    # A wakes up with a poll in flight: none of its writes applies, no notice is staged
    staged: list[int] = []
    assert not await write_as(fence_a, next_ima_ml_entry=10)
    with records.fenced(fence_a):
        assert not await records.update_if_state(sa_, "agent-00", [records.GET_QUOTE],
                                                 operational_state=records.GET_QUOTE_RETRY)
        assert not await records.record_failure(sa_, "agent-00", state=records.FAILED, event_id="x",
                                                severity_level=9, only_in_states=[records.GET_QUOTE],
                                                also=lambda conn: staged.append(1))
    row = await records.get(sa_, "agent-00")
    assert row is not None
    assert (row["attestation_count"], row["next_ima_ml_entry"], row["operational_state"]) == (2, 60, records.GET_QUOTE)
    assert staged == []

    # A's next tick finds the lease gone: its monitor stops; B's claim stands
    await a.tick()
    assert ma.running == set() and mb.running == {"agent-00"}
    # without a fence (a single-process verifier, the REST routes) writes are as before
    assert await write_as(None)
    assert await count(sa_, "agent-00") == 3


async def test_a_claim_waits_for_a_fenced_write_in_flight(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, pg_url: str  # noqa: F811
) -> None:
    """The old holder's write commits before the new holder's claim, or not at all: a write still
    open (its transaction holds the lease row FOR KEY SHARE) makes the claim skip the row."""

    def wall() -> float:
        return T0 + mock_clock.current_time()

    sa_, sb = [await Store.open(pg_url, migrations=MIGRATIONS, pool_size=2) for _ in range(2)]
    await sa_.write(lambda conn: conn.execute(sa.insert(agents_table), [agent_row("agent-00")]))
    ma, mb = TaskMonitors(nursery), TaskMonitors(nursery)
    a = Cluster(sa_, verifier_id=VID, monitors=ma, ttl=TTL, renew_interval=RENEW, margin=MARGIN,
                clock=wall, instance_id="A")
    b = Cluster(sb, verifier_id=VID, monitors=mb, ttl=TTL, renew_interval=RENEW, margin=MARGIN,
                clock=wall, instance_id="B")
    await a.tick()
    mock_clock.jump(TTL + 0.1)
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            txn = conn.begin()
            stmt = (sa.update(agents_table).where(agents_table.c.agent_id == "agent-00",
                                                  records._fence_cond(records.Fence("A", 1)))
                    .values(attestation_count=agents_table.c.attestation_count + 1))
            assert conn.execute(stmt).rowcount == 1  # A's write, not committed yet
            await b.tick()
            assert b.held == set()  # the row is locked by A's write: B skips it this round
            txn.commit()
    finally:
        engine.dispose()
    await b.tick()
    assert b.held == {"agent-00"}
    with records.fenced(records.Fence("A", 1)):  # from here on A's writes match nothing
        assert not await records.update_if_state(sa_, "agent-00", [records.GET_QUOTE], attestation_count=0)
    assert await count(sa_, "agent-00") == 1
