"""Store.submit_grouped / collect / drop: a write queued without waiting, committed by a committer
task (real SQLite and PostgreSQL, trio's MockClock with autojump: the linger passes at once).

What the monitors rely on: every queued write is committed once (count +1 per write), its
outcome is collected without a checkpoint once its group ran, a write taken back before its group
started writes nothing (and nobody waits for it forever), one taken back too late completes, a
cancelled collect follows write_grouped's rules, an error in a group reaches only its writer, and
the committer ends when the queue is empty (its nursery can close).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from keytrio.actors.common.store import Dropped, Store
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

meta = sa.MetaData()
t = sa.Table("t", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("n", sa.Integer, nullable=False))
N = 6


def inc(i: int) -> Callable[[Any], int]:
    return lambda conn: conn.execute(sa.update(t).where(t.c.id == i).values(n=t.c.n + 1)).rowcount


def boom(conn: Any) -> int:
    raise ValueError("boom")


async def _open(url: str, linger: float = 0.25) -> Store:
    store = await Store.open(url, meta)
    await store.write(lambda c: c.execute(sa.insert(t), [{"id": i, "n": 0} for i in range(N)]))
    store.group_linger = linger
    return store


async def settle(store: Store) -> None:
    """Until no group is queued or running (the worker thread runs in real time while the clock
    jumps: sleeping in small steps lets it finish)."""
    while store._queue or store._busy or store._committing:
        await trio.sleep(0.01)


async def _counts(store: Store) -> dict[int, int]:
    return dict(await store.read(lambda c: [tuple(r) for r in c.execute(sa.select(t.c.id, t.c.n))]))


async def test_every_queued_write_is_committed_once_and_collected_without_a_checkpoint(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url)
    try:
        async with trio.open_nursery() as nursery:
            for round_ in range(1, 6):
                jobs = [store.submit_grouped(inc(i), nursery) for i in range(N)]
                assert not any(j.done for j in jobs)  # queued, nobody waited
                await settle(store)
                assert all(j.done for j in jobs)
                for j in jobs:
                    with trio.testing.assert_no_checkpoints():
                        assert await store.collect(j) == 1
                assert await _counts(store) == {i: round_ for i in range(N)}
        # the nursery closed by itself: the committer ended with the queue empty
        assert not store._committing and not store._queue
    finally:
        await store.close()


async def test_a_write_taken_back_before_its_group_writes_nothing(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url)
    try:
        async with trio.open_nursery() as nursery:
            a, b = store.submit_grouped(inc(0), nursery), store.submit_grouped(inc(1), nursery)
            assert store.drop(a)
            assert a.done  # nobody waits for it
            with pytest.raises(Dropped):
                await store.collect(a)
            await settle(store)
            assert await store.collect(b) == 1
            assert not store.drop(b)  # ran: too late to take back
        assert await _counts(store) == {0: 0, 1: 1, **{i: 0 for i in range(2, N)}}
    finally:
        await store.close()


async def test_a_write_taken_back_after_its_group_started_completes(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=0.0)
    started, gate = threading.Event(), threading.Event()

    def held(conn: Any) -> int:
        started.set()
        gate.wait(30)
        return inc(2)(conn)

    try:
        async with trio.open_nursery() as nursery:
            job = store.submit_grouped(held, nursery)
            await trio.to_thread.run_sync(started.wait)
            assert not store.drop(job)
            gate.set()
            assert await store.collect(job) == 1
        assert (await _counts(store))[2] == 1
    finally:
        gate.set()
        await store.close()


async def test_a_cancelled_collect_drops_a_write_not_started_and_waits_for_a_started_one(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=1.0)
    started, gate = threading.Event(), threading.Event()

    def held(conn: Any) -> int:
        started.set()
        gate.wait(30)
        return inc(4)(conn)

    try:
        async with trio.open_nursery() as nursery:
            job = store.submit_grouped(inc(3), nursery)
            with trio.move_on_after(0.5):  # the committer still lingers: nothing started
                await store.collect(job)
            assert job.done and job not in store._queue
            await settle(store)
            assert (await _counts(store))[3] == 0

            job = store.submit_grouped(held, nursery)
            async with trio.open_nursery() as inner:
                async def cancel_once_started() -> None:
                    await trio.to_thread.run_sync(started.wait)
                    inner.cancel_scope.cancel()
                    await trio.sleep(0.1)
                    assert not job.done  # the collect below is still waiting, shielded
                    gate.set()
                nursery.start_soon(cancel_once_started)
                await store.collect(job)  # shielded until the group ended, then Cancelled
                pytest.fail("collect returned although cancelled")  # pragma: no cover
            assert job.done
        assert (await _counts(store))[4] == 1
    finally:
        gate.set()
        await store.close()


async def test_an_error_in_a_group_reaches_only_its_writer(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url)
    try:
        async with trio.open_nursery() as nursery:
            jobs = [store.submit_grouped(inc(0), nursery), store.submit_grouped(boom, nursery),
                    store.submit_grouped(inc(1), nursery)]
            await settle(store)
            assert await store.collect(jobs[0]) == 1
            with pytest.raises(ValueError, match="boom"):
                await store.collect(jobs[1])
            assert await store.collect(jobs[2]) == 1
        assert await _counts(store) == {0: 1, 1: 1, **{i: 0 for i in range(2, N)}}
    finally:
        await store.close()


async def test_callers_that_wait_and_a_committer_share_the_queue(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    """write_grouped callers (no nursery: they lead) and queued writes (committer) in any
    interleaving: every write committed once, every caller answered, nothing left running."""
    store = await _open(db_url)
    try:
        async with trio.open_nursery() as nursery:
            async def waiter(i: int, delay: float) -> None:
                await trio.sleep(delay)
                assert await store.write_grouped(inc(i)) == 1

            queued = []
            for k in range(4):
                nursery.start_soon(waiter, k % N, 0.1 * k)
                queued.append(store.submit_grouped(inc((k + 3) % N), nursery))
                await trio.sleep(0.13)
            await settle(store)
            assert [await store.collect(j) for j in queued] == [1, 1, 1, 1]
        assert sum((await _counts(store)).values()) == 8
        assert not store._committing and not store._busy and not store._queue
    finally:
        await store.close()
