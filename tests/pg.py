"""PostgreSQL fixtures: a server (started if it is local and down), one fresh database per test.

- ``pg_admin_url`` (session): a SQLAlchemy URL of a role that may create databases. From
  ``KEYTRIO_TEST_PG_URL`` if set, else ``postgresql+psycopg://keytrio:keytrio@127.0.0.1:5432/postgres``;
  when that fails and we are root on a Debian host with a local cluster, the cluster is started
  (``pg_ctlcluster <ver> main start``) and the ``keytrio`` role created. Tests that need it
  fail, with the reason, when no server can be reached (``./scripts/setup`` installs PostgreSQL).
- ``pg_url``: a new empty database for one test (dropped afterwards, WITH (FORCE):
  testbed.postgres.drop_database).
- ``db_url``: parametrized ``sqlite`` | ``postgresql``: a SQLite file URL or ``pg_url``.

Use: ``from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401`` in a test module (or list
``"tests.pg"`` in the root conftest's ``pytest_plugins``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from keytrio.actors.common.store import sqlite_url
from keytrio.testbed.postgres import PostgresUnavailable, drop_database, find_server


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    try:
        return find_server()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    name = f"keytrio_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.dispose()
    drop_database(pg_admin_url, name)  # past an autovacuum worker that FORCE may not end


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "db.sqlite")
    return request.getfixturevalue("pg_url")
