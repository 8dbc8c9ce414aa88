"""Schema migrations with alembic, driven from code (no alembic.ini, no env.py).

Each actor keeps its revisions as plain Python modules in a package directory (e.g.
``actors/verifier/migrations/``), so they ship with the package without package-data. A
:class:`Migrations` names that directory, the actor's own version table (registrar and verifier
may share one PostgreSQL database, so each keeps its own ``<actor>_alembic_version``), the first
revision and a table that only exists once that first schema exists.

A database made before migrations existed (``metadata.create_all`` of the first schema) has the
actor's tables but no version table: :func:`upgrade` stamps it at the first revision, then
upgrades. On PostgreSQL the whole upgrade runs in one transaction under an advisory lock, so
several verifiers starting at once on one database migrate it exactly once.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("keytrio.store")


class SchemaOutOfDate(RuntimeError):
    """The database is not at the code's schema revision and automatic upgrade is off."""


@dataclass(frozen=True)
class Migrations:
    """Where an actor's revisions live and how its database is recognised."""

    actor: str
    directory: Path
    first_revision: str
    marker_table: str  # a table of the first revision: present = a pre-migrations database

    @property
    def version_table(self) -> str:
        return f"{self.actor}_alembic_version"

    def script(self) -> ScriptDirectory:
        d = str(self.directory)
        return ScriptDirectory(d, version_locations=[d])

    def head(self) -> str:
        head = self.script().get_current_head()
        assert head is not None, f"no revisions in {self.directory}"
        return head


def _context(conn: Connection, m: Migrations, **opts: object) -> MigrationContext:
    return MigrationContext.configure(conn, opts={"version_table": m.version_table, **opts})


def current(conn: Connection, m: Migrations) -> str | None:
    """The revision the database is at (None: empty or pre-migrations database)."""
    return _context(conn, m).get_current_revision()


def _is_unversioned(conn: Connection, m: Migrations) -> bool:
    tables = set(sa.inspect(conn).get_table_names())
    return m.version_table not in tables and m.marker_table in tables


def _lock(conn: Connection, m: Migrations) -> None:
    if conn.dialect.name == "postgresql":
        # one migrator per database at a time; released at the end of the transaction
        key = zlib.crc32(m.version_table.encode()) & 0x7FFFFFFF
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def upgrade_connection(conn: Connection, m: Migrations, target: str = "head") -> tuple[str | None, str]:
    """Upgrade inside the caller's transaction; returns (revision before, revision after)."""
    _lock(conn, m)
    script = m.script()
    if _is_unversioned(conn, m):
        log.info("event=db.stamp actor=%s revision=%s (tables made before migrations)", m.actor, m.first_revision)
        _context(conn, m).stamp(script, m.first_revision)
    before = current(conn, m)

    def steps(rev: object, _ctx: object) -> object:
        return script._upgrade_revs(target, rev)  # what `alembic upgrade` itself runs

    ctx = _context(conn, m, fn=steps, transactional_ddl=conn.dialect.name == "postgresql")
    with Operations.context(ctx):
        ctx.run_migrations()
    after = current(conn, m)
    if before != after:
        log.info("event=db.upgraded actor=%s from=%s to=%s", m.actor, before, after)
    assert after is not None
    return before, after


def upgrade(engine: Engine, m: Migrations, target: str = "head") -> tuple[str | None, str]:
    """Upgrade ``engine``'s database to ``target`` (default: the newest revision), committed."""
    with engine.begin() as conn:
        return upgrade_connection(conn, m, target)


def check_current(engine: Engine, m: Migrations) -> None:
    """Raise SchemaOutOfDate unless the database is at the newest revision."""
    with engine.connect() as conn:
        rev = current(conn, m)
    head = m.head()
    if rev != head:
        raise SchemaOutOfDate(
            f"{m.actor} database is at revision {rev or 'none'}, this version needs {head}: "
            f"run `keytrio {m.actor} db upgrade --config FILE` or set auto_migrate_db = true"
        )
