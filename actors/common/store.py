"""The actors' database: SQLAlchemy Core on SQLite (one file, WAL) by default, PostgreSQL by URL.

SQLAlchemy blocks, so every database call runs in a worker thread through
``trio.to_thread.run_sync``; a limiter bounds how many run at once (one writer for SQLite,
the pool size for PostgreSQL). ``Store.write`` commits before it returns, so a handler that
awaits it and then answers never acknowledges what a crash could lose.

Schema: actors pass their :class:`~actors.common.migrations.Migrations`; the database is then
upgraded at open (``auto_migrate``) or checked to be current (SchemaOutOfDate otherwise).
Without migrations ``metadata.create_all`` makes the tables: kept for scratch stores of tests and
tools that have no revision history (no actor uses it).

SQLite files hold secrets (the verifier's V keys and notifier key, the registrar's auth tags):
the database file is created 0600 before SQLite opens it, so its -wal and -shm files, which
SQLite creates with the database file's mode, are 0600 too, whatever the umask; a missing
directory is created 0700.

PostgreSQL: the pool holds ``pool_size`` connections plus at most ``max_overflow`` more, and the
thread limiter equals that bound, so no thread ever waits on the pool inside a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import outcome
import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection, Engine

from keytrio.actors.common.migrations import Migrations, check_current, current, upgrade
from keytrio.actors.common.private_files import private_dir, private_file

T = TypeVar("T")


def parse_pool(value: str) -> tuple[int, int]:
    """``"<pool size>,<max overflow>"`` (upstream's ``database_pool_sz_ovfl``) -> (size, overflow)."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        size, overflow = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError('must be "<pool size>,<max overflow>", e.g. "5,10"') from None
    if not (1 <= size <= 1000 and 0 <= overflow <= 1000):
        raise ValueError("pool size must be 1-1000 and max overflow 0-1000")
    return size, overflow


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for in-memory databases and other engines)."""
    if not url.startswith("sqlite"):
        return None
    parsed = sa.engine.make_url(url)
    name = parsed.database
    if not name or name == ":memory:" or parsed.query.get("mode") == "memory":
        return None
    return Path(name)


def secure_sqlite_files(url: str) -> None:
    """(blocking) Create the database file 0600 (its directory 0700 when missing) and bring an
    existing database, -wal and -shm back to 0600."""
    path = sqlite_file(url)
    if path is None:
        return
    if not path.parent.exists():
        private_dir(path.parent)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            private_file(extra)


def _make_engine(url: str, pool_size: int, max_overflow: int = 0) -> Engine:
    if url.startswith("sqlite"):
        secure_sqlite_files(url)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the writer; synchronous=FULL makes a commit durable
            # before we acknowledge it (NORMAL could lose the last commits on power loss).
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True, pool_timeout=30
    )


class Store:
    """One database for one actor. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, engine: Engine, limiter: trio.CapacityLimiter) -> None:
        self.engine = engine
        self._limiter = limiter
        self._queue: list[_Job] = []  # write_grouped calls waiting for the next group
        self._busy = False  # a write_grouped group is lingering or running
        self._committing = False  # a committer task (submit_grouped's nursery) runs the groups
        self._wanted = trio.Event()  # wakes the committer: a write was queued or a leader ended
        #: the time by which the group holding the queued urgent writes commits (None: none queued)
        self._urgent_by: float | None = None
        self._cut: trio.Event | None = None  # set to end the linger under way (None: no linger)
        #: seconds the leader of a write_grouped group waits for more callers before it commits
        #: (0: only calls that arrive while a commit runs share it). Callers that can afford the
        #: wait (a monitor sleeps quote_interval after its write anyway) set it so that one thread
        #: hop and one commit serve tens of writes instead of one; an ``urgent`` write (someone
        #: waits for it with a client on the other end) cuts a linger down to ``urgent_linger``.
        self.group_linger = 0.0
        #: seconds an urgent write may wait for others to share its commit (never longer than
        #: ``group_linger``). 0: it commits at once, alone unless writes queued meanwhile; more
        #: lets concurrent requests share a commit (and its fsync) at that much latency each.
        self.urgent_linger = 0.0
        #: what the grouped writes (write_grouped, submit_grouped; not :meth:`write`) committed,
        #: counted in the trio thread as a group is taken (a couple of adds per group, none per
        #: write): groups by what they hold (background writes only, urgent only, both) and writes
        #: by kind. A group whose transaction fails counts once (its writes then run one by one).
        self.groups_background = self.groups_urgent = self.groups_mixed = 0
        self.writes_background = self.writes_urgent = 0
        self._urgent_queued = 0  # urgent writes in the queue (the next group's share of them)

    @classmethod
    async def open(
        cls,
        url: str,
        metadata: sa.MetaData | None = None,
        *,
        pool_size: int = 5,
        max_overflow: int = 0,
        migrations: Migrations | None = None,
        auto_migrate: bool = True,
    ) -> Store:
        engine = await trio.to_thread.run_sync(_make_engine, url, pool_size, max_overflow)
        # SQLite serialises writers anyway; more threads would only wait on its lock.
        limiter = trio.CapacityLimiter(1 if url.startswith("sqlite") else pool_size + max_overflow)
        store = cls(engine, limiter)
        try:
            if migrations is not None:
                if auto_migrate:
                    await store._run(lambda: upgrade(engine, migrations))
                else:
                    await store._run(lambda: check_current(engine, migrations))
            elif metadata is not None:
                await store._run(lambda: metadata.create_all(engine))
        except BaseException:
            with trio.CancelScope(shield=True):
                await store.close()
            raise
        return store

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in a read transaction."""

        def work() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        return await self._run(work)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in a transaction and commit it before returning."""

        def work() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return await self._run(work)

    async def write_grouped(self, fn: Callable[[Connection], T], *, urgent: bool = False) -> T:
        """Like :meth:`write` (``fn`` committed before this returns), but group-committed: calls
        that arrive while a transaction is running are run together in the next one.

        For small, frequent, independent writes (the monitors' per-poll success records): one
        thread hop, one transaction and one fsync per group instead of per call. With
        ``group_linger`` > 0 the leader first waits that long (trio clock) for more callers, unless
        the group holds an ``urgent`` write: one that a request waits for (a client on the other
        end) cuts the linger under way down to ``urgent_linger`` from its arrival (0: ended at
        once), and so does the group after a running commit that holds one (it still takes every
        write queued by then). ``fn`` must only touch ``conn`` (no side effects elsewhere): when
        one ``fn`` of a group raises, the group is rolled back and every ``fn`` of it runs again
        in a transaction of its own, so the error reaches only its caller. Cancelled before its
        group started, a call writes nothing; once started, it completes (committed or not)
        before Cancelled is raised, as with :meth:`write`.
        """
        return await self.collect(self.submit_grouped(fn, urgent=urgent))

    def submit_grouped(
        self, fn: Callable[[Connection], T], nursery: trio.Nursery | None = None, *, urgent: bool = False
    ) -> GroupedWrite:
        """Queue ``fn`` for the next group without waiting (no checkpoint); :meth:`collect` gives
        its result, :meth:`drop` takes it back while its group has not started.

        With ``nursery``, a committer task is started there when none runs: it runs the groups
        (lingering as a leader would) until the queue is empty, so nobody has to wait for a
        queued write to be committed. Without one, the write is run by whichever caller leads
        next (a :meth:`write_grouped` or the :meth:`collect` of this write). ``urgent``: as for
        :meth:`write_grouped` (its group lingers at most ``urgent_linger``)."""
        job = _Job(fn)
        self._queue.append(job)
        if urgent:
            self._urgent_queued += 1
            job.urgent_by = by = trio.current_time() + self.urgent_linger
            if self._urgent_by is None or by < self._urgent_by:
                self._urgent_by = by
                if self._cut is not None:  # a leader or the committer lingers: it ends sooner
                    self._cut.set()
        if self._committing:
            self._wanted.set()
        elif nursery is not None:  # it waits for a leader's group under way to end
            self._wanted = trio.Event()
            nursery.start_soon(self._committer)  # a closed nursery raises: no committer then
            self._committing = True
        return job

    async def collect(self, job: GroupedWrite) -> Any:
        """The result of a :meth:`submit_grouped` write: at once when its group has committed
        (no checkpoint), else once it has (leading the group when no one else runs it).
        Cancelled: as :meth:`write_grouped` (dropped if not started, else awaited, shielded)."""
        while not job.done:
            if self._busy or self._committing:  # someone else runs the groups: wait for ours
                job.waiting = True
                if job.wake is None:  # made when first waited for: most writes never are
                    job.wake = trio.Event()
                try:
                    await job.wake.wait()
                except trio.Cancelled:
                    if self.drop(job):  # not started: dropped, the lead passed on if it was ours
                        raise
                    with trio.CancelScope(shield=True):  # started: its outcome comes soon
                        while not job.done:
                            await job.wake.wait()
                            job.wake = trio.Event()
                    raise
                job.wake = trio.Event()
                continue
            self._busy = True
            try:
                await self._linger()
            except trio.Cancelled:  # nothing started yet: drop ours, hand the lead on
                self._busy = False
                self.drop(job)
                raise
            group = self._take()
            try:
                with trio.CancelScope(shield=True):  # the group's callers wait for this outcome
                    await self._run(partial(self._commit_group, group))
            finally:
                self._busy = False
                self._finish(group)
                self._pass_lead()
        if job.outcome is None:  # its group ran but did not get to it (the hand-off failed)
            job.outcome = outcome.Error(RuntimeError("write_grouped: not run"))
        return job.outcome.unwrap()

    def drop(self, job: GroupedWrite) -> bool:
        """Take back a queued write whose group has not started (True); False once it has (it
        then completes, committed or not)."""
        try:
            self._queue.remove(job)
        except ValueError:
            return False
        job.outcome = outcome.Error(Dropped())
        job.done = True  # nobody may wait for a write that will not run
        if job.urgent_by is not None:  # the next group lingers as the urgent writes left say
            self._urgent_queued -= 1
            self._urgent_by = min((j.urgent_by for j in self._queue if j.urgent_by is not None), default=None)
        if job.waiting:
            job.wake.set()
        self._pass_lead()
        return True

    async def _committer(self) -> None:
        # runs groups while there are queued writes, then ends (a nursery whose users all ended
        # can close); one wake-up per group instead of one per write
        try:
            while self._queue:
                if self._busy:  # a caller leads the group under way: its end wakes us
                    self._wanted = trio.Event()
                    await self._wanted.wait()
                    continue
                self._busy = True
                group: list[_Job] = []
                try:
                    await self._linger()  # cancelled here: nothing started
                    group = self._take()
                    with trio.CancelScope(shield=True):  # started writes complete
                        await self._run(partial(self._commit_group, group))
                except Exception as exc:  # the hand-off itself failed: every writer of the group
                    # gets the error (nothing of ours may reach the nursery's owner)
                    for j in group:
                        j.outcome = outcome.Error(exc)
                finally:
                    self._busy = False
                    self._finish(group)
        finally:
            self._committing = False
            self._pass_lead()

    async def _linger(self) -> None:
        # the leader's (or committer's) wait for more writes, until group_linger or the queued
        # urgent writes' time, whichever comes first; an urgent write that brings that time
        # forward wakes it (a fresh event per wait: a set one from an earlier wait must not cut
        # this one short). Cancelled from outside: raised as trio.sleep would (move_on_at catches
        # only its own). An urgent time already reached returns without a checkpoint.
        if self.group_linger <= 0:
            return
        end = trio.current_time() + self.group_linger
        while True:
            if self._urgent_by is not None and self._urgent_by < end:
                end = self._urgent_by
                if end <= trio.current_time():
                    return
            self._cut = cut = trio.Event()
            try:
                with trio.move_on_at(end):
                    await cut.wait()
            finally:
                self._cut = None
            if not cut.is_set():  # the time ran out
                return

    def _take(self) -> list[_Job]:
        # the queue becomes the group under way; urgent writes queued after this go into the next
        group, self._queue = self._queue, []
        self._urgent_by = None
        urgent, n = self._urgent_queued, len(group)
        if not urgent:
            if n:  # (the committer's queue may have been dropped whole while it lingered)
                self.groups_background += 1
                self.writes_background += n
        else:
            self._urgent_queued = 0
            self.writes_urgent += urgent
            if urgent == n:
                self.groups_urgent += 1
            else:
                self.groups_mixed += 1
                self.writes_background += n - urgent
        return group

    @staticmethod
    def _finish(group: list[_Job]) -> None:
        for j in group:
            j.done = True
            if j.waiting:
                j.wake.set()

    def _pass_lead(self) -> None:
        # the committer, or else the first caller waiting for its write, runs the next group
        if self._busy or not self._queue:
            return
        if self._committing:
            self._wanted.set()
            return
        for j in self._queue:
            if j.waiting:
                j.wake.set()
                return

    def _commit_group(self, group: list[_Job]) -> None:
        """(worker thread) All of ``group`` in one transaction; one by one if any of them fails."""
        try:
            with self.engine.begin() as conn:
                results = [fn(conn) for fn in (j.fn for j in group)]
        except Exception:  # which fn failed (and what the others give) is found out one by one
            if len(group) == 1:
                group[0].outcome = outcome.capture(self._txn, group[0].fn)
                return
            for j in group:
                j.outcome = outcome.capture(self._txn, j.fn)
            return
        for j, r in zip(group, results, strict=True):
            j.outcome = outcome.Value(r)

    def _txn(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return fn(conn)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.engine.dispose)


class Dropped(Exception):
    """The outcome of a queued write taken back by :meth:`Store.drop` (it wrote nothing)."""


class _Job:
    """One queued write of :meth:`Store.submit_grouped`: its function, outcome and wake-up event
    (set only when someone waits for it). The outcome (None: not run) and the event are made
    when needed, not per write: an exception, an Outcome and an Event cost ≈ 1.7 µs a poll."""

    __slots__ = ("done", "fn", "outcome", "urgent_by", "waiting", "wake")

    def __init__(self, fn: Callable[[Connection], Any]) -> None:
        self.fn = fn
        #: urgent (someone waits for it): the time by which its group commits; None: background
        self.urgent_by: float | None = None
        self.outcome: outcome.Outcome[Any] | None = None
        self.done = False
        self.waiting = False
        self.wake: trio.Event | None = None


#: a write queued by :meth:`Store.submit_grouped` (``.done``: its group has run)
GroupedWrite = _Job


def db_command(action: str, url: str, migrations: Migrations, *, data_dir: Path | None = None) -> str:
    """``keytrio <actor> db upgrade|current`` (blocking); returns the line to print."""
    if url.startswith("sqlite") and data_dir is not None:
        private_dir(Path(data_dir))
    engine = _make_engine(url, 1, 0)
    try:
        if action == "upgrade":
            before, after = upgrade(engine, migrations)
            return f"{migrations.actor} database: {before or 'empty'} -> {after}"
        with engine.connect() as conn:
            rev = current(conn, migrations)
        return f"{migrations.actor} database: at {rev or 'none'}, newest {migrations.head()}"
    finally:
        engine.dispose()
