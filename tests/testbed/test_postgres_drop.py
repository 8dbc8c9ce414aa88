"""testbed.postgres.drop_database: a database with a session this role may not end (what an
autovacuum worker is to a role that is not a superuser: CI once failed a test's teardown on it)
is dropped once that session is gone, not refused. Real PostgreSQL; the other session is the
``postgres`` superuser's own psql, started with runuser (root, as ./scripts/test runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa

from keytrio.testbed.postgres import INSUFFICIENT_PRIVILEGE, drop_database
from tests.pg import pg_admin_url  # noqa: F401


def _sessions(admin: sa.Engine, name: str) -> int:
    with admin.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                                {"d": name}).scalar_one())


def test_a_session_force_may_not_end_delays_the_drop_instead_of_failing_it(pg_admin_url: str) -> None:  # noqa: F811
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to open the postgres superuser's own session")
    name = f"keytrio_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    holder = None
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        # the superuser's session on the database, for 2 s (the kind of backend FORCE may not end)
        holder = subprocess.Popen(["runuser", "-u", "postgres", "--", "psql", "-d", name, "-qc",
                                   "SELECT pg_sleep(2)"], cwd="/", stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30  # a hang guard only
        while _sessions(admin, name) == 0:
            assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)  # another process's progress: polled
        # as the fixtures dropped it before: refused, SQLSTATE 42501
        with pytest.raises(sa.exc.DBAPIError) as refused, admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        assert getattr(refused.value.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE, refused.value
        # drop_database waits the session out, then drops
        drop_database(pg_admin_url, name)
        assert holder.wait(timeout=30) == 0
        with admin.connect() as conn:
            left = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": name}).first()
        assert left is None
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
