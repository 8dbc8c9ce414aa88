"""PostgreSQL fixtures: a server (started if it is local and down), one fresh database per test.

- ``pg_admin_url`` (session): a SQLAlchemy URL of a role that may create databases. From
  ``KEYTRIO_TEST_PG_URL`` if set, else ``postgresql+psycopg://keytrio:keytrio@127.0.0.1:5432/postgres``;
  when that fails and we are root on a Debian host with a local cluster, the cluster is started
  (``pg_ctlcluster <ver> main start``) and the ``keytrio`` role created. Tests that need it
  fail, with the reason, when no server can be reached (``./scripts/setup`` installs PostgreSQL).
- ``pg_url``: a new empty database for one test (dropped afterwards, WITH (FORCE)).
- ``db_url``: parametrized ``sqlite`` | ``postgresql``: a SQLite file URL or ``pg_url``.

Use: ``from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401`` in a test module (or list
``"tests.pg"`` in the root conftest's ``pytest_plugins``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from keytrio.actors.common.store import sqlite_url

DEFAULT_URL = "postgresql+psycopg://keytrio:keytrio@127.0.0.1:5432/postgres"
ROLE_SQL = (
    "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='keytrio') THEN "
    "CREATE ROLE keytrio LOGIN CREATEDB PASSWORD 'keytrio'; END IF; END$$;"
)


def _try(url: str) -> str | None:
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


def _start_local_cluster() -> str | None:
    """Start Debian's local cluster and create the test role; None on success, else why not."""
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


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    url = os.environ.get("KEYTRIO_TEST_PG_URL", DEFAULT_URL)
    problem = _try(url)
    if problem is not None and url == DEFAULT_URL:
        started = _start_local_cluster()
        problem = _try(url) if started is None else started
    if problem is not None:
        pytest.fail(f"PostgreSQL not available: {problem}")
    return url


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    name = f"keytrio_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "db.sqlite")
    return request.getfixturevalue("pg_url")
