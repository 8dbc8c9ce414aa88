"""The actors' database: SQLAlchemy Core on SQLite (one file, WAL) by default, PostgreSQL by URL.

SQLAlchemy blocks, so every database call runs in a worker thread through
``trio.to_thread.run_sync``; a limiter bounds how many run at once (one writer for SQLite,
the pool size for PostgreSQL). ``Store.write`` commits before it returns, so a handler that
awaits it and then answers never acknowledges what a crash could lose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _make_engine(url: str, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
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
    return sa.create_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True, pool_timeout=30)


class Store:
    """One database for one actor. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, engine: Engine, limiter: trio.CapacityLimiter) -> None:
        self.engine = engine
        self._limiter = limiter

    @classmethod
    async def open(cls, url: str, metadata: sa.MetaData, *, pool_size: int = 5) -> Store:
        engine = await trio.to_thread.run_sync(_make_engine, url, pool_size)
        # SQLite serialises writers anyway; more threads would only wait on its lock.
        limiter = trio.CapacityLimiter(1 if url.startswith("sqlite") else pool_size)
        store = cls(engine, limiter)
        await store._run(lambda: metadata.create_all(engine))
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

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.engine.dispose)
