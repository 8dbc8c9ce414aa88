"""A PostgreSQL server to run against: the tests' fixtures and the cluster testbed use the same one.

``find_server(url)`` answers with an admin URL (a role that may create databases) of a reachable
server: ``url``, else ``$KEYTRIO_TEST_PG_URL``, else the local default, in which case Debian's local
cluster is started when it is down and we are root, and the ``keytrio`` role created
(``./scripts/setup`` installs PostgreSQL). It raises :class:`PostgresUnavailable` saying why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import sqlalchemy as sa

DEFAULT_ADMIN_URL = "postgresql+psycopg://keytrio:keytrio@127.0.0.1:5432/postgres"
ROLE_SQL = (
    "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='keytrio') THEN "
    "CREATE ROLE keytrio LOGIN CREATEDB PASSWORD 'keytrio'; END IF; END$$;"
)


#: SQLSTATE insufficient_privilege: what DROP DATABASE ... WITH (FORCE) answers when a backend on
#: the database may not be ended by this role (an autovacuum worker, another role's session)
INSUFFICIENT_PRIVILEGE = "42501"


class PostgresUnavailable(Exception):
    """No PostgreSQL server could be reached (the message says why)."""


def try_connect(url: str) -> str | None:
    """None if ``url`` answers ``SELECT 1``, else the first line of the reason."""
    try:
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    except sa.exc.OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    return None


def start_local_cluster() -> str | None:
    """Start Debian's local cluster and create the keytrio role; None on success, else why not."""
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        return "no local PostgreSQL cluster we may start (apt-get install postgresql; run as root)"
    versions = sorted(Path("/usr/lib/postgresql").glob("*"), key=lambda p: p.name)
    if not versions:
        return "postgresql is not installed (apt-get install postgresql)"
    ver = versions[-1].name
    start = subprocess.run(["pg_ctlcluster", ver, "main", "start"], capture_output=True, text=True, timeout=60)
    if start.returncode not in (0, 2):  # 2: already running
        return f"pg_ctlcluster {ver} main start failed: {(start.stderr or start.stdout).strip()[:200]}"
    role = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-qc", ROLE_SQL],
                          capture_output=True, text=True, timeout=60)
    if role.returncode != 0:
        return f"could not create the keytrio role: {role.stderr.strip()[:200]}"
    return None


def find_server(url: str | None = None) -> str:
    """An admin URL of a reachable server (see the module docstring); raises PostgresUnavailable."""
    url = url or os.environ.get("KEYTRIO_TEST_PG_URL", DEFAULT_ADMIN_URL)
    problem = try_connect(url)
    if problem is not None and url == DEFAULT_ADMIN_URL:
        started = start_local_cluster()
        problem = try_connect(url) if started is None else started
    if problem is not None:
        raise PostgresUnavailable(f"PostgreSQL not available: {problem}")
    return url


def drop_database(admin_url: str, name: str, *, wait: float = 30.0) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)`` as ``admin_url``'s role (blocking).

    FORCE ends the sessions on the database, but a role that is not a superuser may not end an
    autovacuum worker (PostgreSQL: "must be a member of the role whose process is being terminated
    or member of pg_signal_backend"), and autovacuum visits these small databases at moments of its
    own choosing: the drop is tried again every 0.1 s until the worker is gone, for ``wait`` seconds
    at most (then the error is raised)."""
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                return
            except sa.exc.DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != INSUFFICIENT_PRIVILEGE or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
    finally:
        engine.dispose()
