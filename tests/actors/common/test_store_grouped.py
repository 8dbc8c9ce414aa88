"""Store.submit_grouped / collect / drop: a write queued without waiting, committed by a committer
task (real SQLite and PostgreSQL, trio's MockClock with autojump: the linger passes at once).

What the monitors rely on: every queued write is committed once (count +1 per write), its
outcome is collected without a checkpoint once its group ran, a write taken back before its group
started writes nothing (and nobody waits for it forever), one taken back too late completes, a
cancelled collect follows write_grouped's rules, an error in a group reaches only its writer, and
the committer ends when the queue is empty (its nursery can close). An urgent write (one a request
waits for) cuts a linger under way, and its group's, down to urgent_linger from its arrival (0:
at once), with the same guarantees.
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


async def urgent_write_cancelled_while_queued(store: Store, nursery: trio.Nursery,
                                              fn: Callable[[Any], int]) -> None:
    """An urgent ``write_grouped(fn)`` cancelled once every task is blocked (it is queued behind
    the group under way): asserts that it was cancelled, not answered."""
    with trio.CancelScope() as scope:
        async def cancel_when_queued() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

        nursery.start_soon(cancel_when_queued)
        await store.write_grouped(fn, urgent=True)
        pytest.fail("the cancelled urgent write returned")  # pragma: no cover
    assert scope.cancelled_caught


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


# --- urgent writes (a request waits for them): no linger ------------------------------------------
# Time is the MockClock's (autojump at once when every task waits): the store's linger is the only
# deadline these tests leave pending, so a write that waited it moves the clock by exactly LONG,
# and one that did not leaves trio.current_time() where it was.

LONG = 10.0  # the linger: far longer than any of these tests' writes take


def counting(store: Store) -> list[int]:
    """Commits of the store's engine from now on (one per transaction that committed)."""
    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda conn: commits.append(1))  # (worker thread)
    return commits


def held_write(i: int) -> tuple[Callable[[Any], int], threading.Event, threading.Event]:
    """A write that stays in its transaction (worker thread) until ``gate`` is set."""
    started, gate = threading.Event(), threading.Event()

    def fn(conn: Any) -> int:
        started.set()
        gate.wait(30)
        return inc(i)(conn)

    return fn, started, gate


async def test_an_urgent_write_ends_a_leaders_linger_and_takes_the_queued_writes_along(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=LONG)
    commits = counting(store)
    try:
        async with trio.open_nursery() as nursery:
            async def background(i: int) -> None:
                assert await store.write_grouped(inc(i)) == 1

            start = trio.current_time()
            nursery.start_soon(background, 0)  # leads the group and lingers
            nursery.start_soon(background, 1)  # queued behind it
            await trio.testing.wait_all_tasks_blocked()
            assert store._busy and len(store._queue) == 2
            assert await store.write_grouped(inc(2), urgent=True) == 1
            assert trio.current_time() == start  # nobody waited the linger
        assert trio.current_time() == start
        assert len(commits) == 1  # the two background writes went in the urgent write's transaction
        assert await store.write_grouped(inc(3)) == 1  # the next linger is a whole one again
        assert trio.current_time() == pytest.approx(start + LONG)
        assert await _counts(store) == {0: 1, 1: 1, 2: 1, 3: 1, **{i: 0 for i in range(4, N)}}
    finally:
        await store.close()


async def test_an_urgent_write_ends_the_committers_linger(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=LONG)
    commits = counting(store)
    try:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            queued = [store.submit_grouped(inc(i), nursery) for i in range(2)]
            await trio.testing.wait_all_tasks_blocked()
            assert store._committing and store._busy  # the committer lingers
            job = store.submit_grouped(inc(2), nursery, urgent=True)
            assert await store.collect(job) == 1
            assert trio.current_time() == start
            assert all(j.done for j in queued) and [await store.collect(j) for j in queued] == [1, 1]
        assert trio.current_time() == start and len(commits) == 1
        assert not store._committing and not store._queue  # the committer ended as before
        async with trio.open_nursery() as nursery:  # the next linger is a whole one again
            job = store.submit_grouped(inc(3), nursery)
        assert await store.collect(job) == 1 and trio.current_time() == pytest.approx(start + LONG)
    finally:
        await store.close()


async def test_the_group_after_a_running_commit_does_not_linger_for_an_urgent_write_then_lingering_resumes(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    """An urgent write that arrives while a commit runs goes into the next group, which commits
    as soon as that commit ends (with the background writes queued meanwhile); the group after
    it, background writes only, lingers again (once with a leader, once with the committer)."""
    store = await _open(db_url, linger=LONG)
    commits = counting(store)
    held, started, gate = held_write(0)
    try:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()

            async def write(fn: Callable[[Any], int], urgent: bool) -> None:
                assert await store.write_grouped(fn, urgent=urgent) == 1

            nursery.start_soon(write, held, True)  # urgent: its group starts at once
            await trio.to_thread.run_sync(started.wait)
            nursery.start_soon(write, inc(1), False)  # both queued behind the running commit
            nursery.start_soon(write, inc(2), True)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store._queue) == 2
            gate.set()
        assert trio.current_time() == start
        assert len(commits) == 2  # the held group, then the other two in one transaction
        # no urgent write queued any more: background writes linger as before
        assert await store.write_grouped(inc(3)) == 1
        assert trio.current_time() == pytest.approx(start + LONG)
        async with trio.open_nursery() as nursery:
            job = store.submit_grouped(inc(4), nursery)
        assert await store.collect(job) == 1
        assert trio.current_time() == pytest.approx(start + 2 * LONG)
        assert await _counts(store) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 0}
    finally:
        gate.set()
        await store.close()


async def test_an_urgent_write_cancelled_before_its_group_is_dropped_and_lingering_resumes(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    """Cancelled while queued behind a running commit: it writes nothing, and the next group
    (background writes only now) lingers as if it had never come."""
    store = await _open(db_url, linger=LONG)
    held, started, gate = held_write(0)
    done_at: dict[str, float] = {}
    try:
        async with trio.open_nursery() as nursery:
            async def write(name: str, fn: Callable[[Any], int], urgent: bool) -> None:
                assert await store.write_grouped(fn, urgent=urgent) == 1
                done_at[name] = trio.current_time()

            nursery.start_soon(write, "held", held, True)
            await trio.to_thread.run_sync(started.wait)
            nursery.start_soon(write, "background", inc(1), False)
            await urgent_write_cancelled_while_queued(store, nursery, inc(2))
            assert len(store._queue) == 1 and store._urgent_by is None
            released = trio.current_time()
            gate.set()
        assert done_at["held"] == released
        assert done_at["background"] == pytest.approx(released + LONG)  # lingered
        assert await _counts(store) == {0: 1, 1: 1, **{i: 0 for i in range(2, N)}}
    finally:
        gate.set()
        await store.close()


async def test_an_urgent_group_with_a_failing_write_runs_again_one_by_one_without_lingering(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=LONG)
    commits = counting(store)
    got: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            async def write(name: str, fn: Callable[[Any], int], urgent: bool = False) -> None:
                try:
                    got[name] = await store.write_grouped(fn, urgent=urgent)
                except ValueError as exc:
                    got[name] = exc

            start = trio.current_time()
            nursery.start_soon(write, "leader", inc(0))  # lingers
            nursery.start_soon(write, "boom", boom)
            await trio.testing.wait_all_tasks_blocked()
            await write("urgent", inc(1), True)
            assert trio.current_time() == start
        assert got["leader"] == 1 and got["urgent"] == 1 and str(got["boom"]) == "boom"
        assert len(commits) == 2  # the group rolled back, then the two good writes alone
        assert await _counts(store) == {0: 1, 1: 1, **{i: 0 for i in range(2, N)}}
    finally:
        await store.close()


# --- urgent_linger > 0: an urgent write may wait a little for others to share its commit ---------

SHORT = 0.5  # the urgent linger set here


async def test_an_urgent_write_cuts_a_linger_down_to_the_urgent_linger_and_a_later_one_does_not_extend_it(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=LONG)
    store.urgent_linger = SHORT
    commits = counting(store)
    done_at: dict[int, float] = {}
    try:
        async with trio.open_nursery() as nursery:
            async def write(i: int, urgent: bool, after: float = 0.0) -> None:
                await trio.sleep(after)
                assert await store.write_grouped(inc(i), urgent=urgent) == 1
                done_at[i] = trio.current_time()

            start = trio.current_time()
            nursery.start_soon(write, 0, False)  # leads the group and lingers LONG
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(write, 1, True)  # cuts the linger to start + SHORT
            nursery.start_soon(write, 2, True, SHORT / 2)  # its own time is later: no extension
            nursery.start_soon(write, 3, False, SHORT / 4)  # a background write still joins
        assert done_at == {i: pytest.approx(start + SHORT) for i in range(4)}
        assert len(commits) == 1
        assert await store.write_grouped(inc(4)) == 1  # the next linger is a whole one again
        assert trio.current_time() == pytest.approx(start + SHORT + LONG)
    finally:
        await store.close()


async def test_the_committers_linger_and_the_group_after_a_running_commit_wait_the_urgent_linger(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=LONG)
    store.urgent_linger = SHORT
    held, started, gate = held_write(0)
    try:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            queued = store.submit_grouped(inc(1), nursery)  # the committer lingers LONG
            await trio.testing.wait_all_tasks_blocked()
            job = store.submit_grouped(inc(2), nursery, urgent=True)
            assert await store.collect(job) == 1 and queued.done
            assert trio.current_time() == pytest.approx(start + SHORT)

            async def first() -> None:
                assert await store.write_grouped(held, urgent=True) == 1

            nursery.start_soon(first)  # lingers SHORT, then runs (held) in the worker thread
            await trio.to_thread.run_sync(started.wait)
            running = trio.current_time()
            job = store.submit_grouped(inc(3), nursery, urgent=True)  # behind the running commit
            await trio.sleep(SHORT / 2)  # (the commit still runs)
            later = store.submit_grouped(inc(4), nursery, urgent=True)  # does not put it off
            gate.set()
            assert await store.collect(job) == 1 and await store.collect(later) == 1
            assert trio.current_time() == pytest.approx(running + SHORT)  # lingered SHORT, not LONG
        assert await _counts(store) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 0}
    finally:
        gate.set()
        await store.close()


async def test_the_urgent_linger_never_makes_a_group_wait_longer_than_group_linger(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    store = await _open(db_url, linger=SHORT / 5)
    store.urgent_linger = SHORT
    try:
        start = trio.current_time()
        assert await store.write_grouped(inc(0), urgent=True) == 1
        assert trio.current_time() == pytest.approx(start + SHORT / 5)
    finally:
        await store.close()


# --- the group counters (the verifier's store_commits_total / store_writes_total) ----------------


def tally(store: Store) -> tuple[int, int, int, int, int]:
    """(background, urgent, mixed) groups, then (background, urgent) writes, as counted so far."""
    return (store.groups_background, store.groups_urgent, store.groups_mixed,
            store.writes_background, store.writes_urgent)  # fmt: skip


async def test_the_counters_count_groups_by_what_they_hold_and_writes_by_kind(
    db_url: str, autojump_clock: trio.testing.MockClock  # noqa: F811
) -> None:
    """Background writes lingering together are one group; an urgent write that cuts their linger
    makes the group mixed; a lone urgent write is an urgent group; an urgent write taken back before
    its group does not count (its group is background only); a group that fails counts once."""
    store = await _open(db_url, linger=LONG)
    held, started, gate = held_write(0)
    try:
        assert tally(store) == (0, 0, 0, 0, 0)
        async with trio.open_nursery() as nursery:  # three background writes linger together
            jobs = [store.submit_grouped(inc(i), nursery) for i in range(3)]
        assert all(j.done for j in jobs) and tally(store) == (1, 0, 0, 3, 0)

        async with trio.open_nursery() as nursery:  # two background writes, an urgent one cuts in
            async def background(i: int) -> None:
                assert await store.write_grouped(inc(i)) == 1

            nursery.start_soon(background, 0)
            nursery.start_soon(background, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert await store.write_grouped(inc(2), urgent=True) == 1
        assert tally(store) == (1, 0, 1, 5, 1)

        assert await store.write_grouped(inc(3), urgent=True) == 1  # alone
        assert tally(store) == (1, 1, 1, 5, 2)

        async with trio.open_nursery() as nursery:  # an urgent write taken back before its group
            async def write(fn: Callable[[Any], int], urgent: bool) -> None:
                assert await store.write_grouped(fn, urgent=urgent) == 1

            nursery.start_soon(write, held, True)  # its group runs (held) in the worker thread
            await trio.to_thread.run_sync(started.wait)
            assert tally(store) == (1, 2, 1, 5, 3)  # counted as it was taken
            nursery.start_soon(write, inc(1), False)
            await urgent_write_cancelled_while_queued(store, nursery, inc(2))
            gate.set()
        assert tally(store) == (2, 2, 1, 6, 3)  # the background write's group: background only

        async with trio.open_nursery() as nursery:  # a failing group counts once, whatever reruns
            nursery.start_soon(write, inc(4), False)  # leads and lingers
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ValueError, match="boom"):
                await store.write_grouped(boom, urgent=True)
        assert tally(store) == (2, 2, 2, 7, 4)
        assert await _counts(store) == {0: 3, 1: 3, 2: 2, 3: 1, 4: 1, 5: 0}
    finally:
        gate.set()
        await store.close()
