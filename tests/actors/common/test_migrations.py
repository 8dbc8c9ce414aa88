"""Schema migrations (alembic) of the registrar's and the verifier's stores, on SQLite and PostgreSQL.

A database at the first revision (the schema released before migrations) with data in it is
upgraded, and the actor then starts on it and serves the old records; the newest revision matches
the tables the code uses (schema.py); a pre-migrations database (tables, no version table) is
stamped and upgraded; with ``auto_migrate_db = false`` an old database is refused until
``keytrio <actor> db upgrade`` ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from keytrio.actors.common.migrations import Migrations, SchemaOutOfDate, current, upgrade
from keytrio.actors.common.startup import Exit, StartupError
from keytrio.actors.registrar.migrations import MIGRATIONS as REGISTRAR
from keytrio.actors.registrar.schema import metadata as registrar_metadata
from keytrio.actors.verifier import records
from keytrio.actors.verifier.migrations import MIGRATIONS as VERIFIER
from keytrio.actors.verifier.schema import metadata as verifier_metadata
from keytrio.protocol import credential
from tests.actors.registrar_support import SoftTpm, registrar_config, running_registrar
from tests.actors.verifier_support import start_verifier, verifier_options
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

OLD_A = "d432fbb3-d2f1-4a97-9ef7-75bd81c01111"  # stopped by the tenant (state 10): not polled
OLD_B = "d432fbb3-d2f1-4a97-9ef7-75bd81c02222"  # GET_QUOTE at a dead port: fails after the upgrade
OLD_C = "d432fbb3-d2f1-4a97-9ef7-75bd81c03333"  # registrar: re-registering under r0001 (active = false)


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url)


def _diffs(url: str, m: Migrations, metadata: sa.MetaData) -> list[Any]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "include_name": lambda name, kind, _p: kind != "table" or name in metadata.tables})
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def test_newest_revisions_match_the_code_schema(db_url: str) -> None:  # noqa: F811
    engine = _engine(db_url)
    try:
        assert upgrade(engine, VERIFIER) == (None, "v0005")
        assert upgrade(engine, REGISTRAR) == (None, "r0002")  # one database may hold both actors
        assert upgrade(engine, VERIFIER) == ("v0005", "v0005")  # idempotent
    finally:
        engine.dispose()
    assert _diffs(db_url, VERIFIER, verifier_metadata) == []
    assert _diffs(db_url, REGISTRAR, registrar_metadata) == []


def _old_agent(agent_id: str, state: int, port: int, ak_tpm: str, pki: Any) -> dict[str, Any]:
    """A verifier_agents row exactly as the first schema's code wrote it."""
    return {
        "agent_id": agent_id, "v": "A" * 43 + "=", "ip": "127.0.0.1", "port": port,
        "tpm_policy": json.dumps({"mask": "0x0"}), "runtime_policy": "", "runtime_policy_name": None,
        "runtime_policy_checksum": None, "runtime_policy_key": None, "mb_policy": None,
        "mb_policy_name": None, "ima_sign_verification_keys": "[]", "meta_data": json.dumps({"old": agent_id[-4:]}),
        "revocation_key": None, "accept_tpm_hash_algs": '["sha256"]', "accept_tpm_encryption_algs": '["ecc", "rsa"]',
        "accept_tpm_signing_algs": '["ecdsa", "rsassa"]', "ak_tpm": ak_tpm, "mtls_cert": pki.agent.pem,
        "supported_version": "2.1", "enrolled_at": time.time() - 3600, "operational_state": state,
        "verifier_id": "default", "severity_level": None, "last_event_id": None, "attestation_count": 41,
        "last_received_quote": 1_700_000_000, "last_successful_attestation": 1_700_000_000, "hash_alg": "sha256",
        "enc_alg": "ecc", "sign_alg": "ecdsa", "v_delivered": True, "next_ima_ml_entry": 7,
        "ima_pcr10": "{}", "boottime": 1_700_000_000, "ima_progress": None, "tpm_clock_info": None,
    }


def _make_first_revision_db(url: str, pki: Any, *, versioned: bool = True) -> None:
    engine = _engine(url)
    try:
        upgrade(engine, VERIFIER, "v0001")
        ak = SoftTpm.new().aik_tpm
        old = sa.MetaData()
        old.reflect(engine)
        with engine.begin() as conn:
            conn.execute(old.tables["verifier_agents"].insert(), [
                _old_agent(OLD_A, records.TENANT_FAILED, 9, ak, pki), _old_agent(OLD_B, records.GET_QUOTE, 9, ak, pki)])
            conn.execute(old.tables["verifier_runtime_policies"].insert().values(
                checksum="0" * 64, policy="{}", runtime_policy_key=None, created_at=1.0))
            if not versioned:  # as metadata.create_all made it before migrations existed
                conn.execute(sa.text(f"DROP TABLE {VERIFIER.version_table}"))
            else:
                assert current(conn, VERIFIER) == "v0001"
    finally:
        engine.dispose()


@pytest.mark.parametrize("versioned", [True, False], ids=["v0001", "pre-migrations"])
async def test_verifier_upgrades_a_first_revision_database_with_data(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, db_url: str, versioned: bool  # noqa: F811
) -> None:
    _make_first_revision_db(db_url, pki, versioned=versioned)
    rv = await start_verifier(nursery, pki, tmp_path / "v", database_url=db_url)
    # the old records are served as they were
    rec = await rv.get(OLD_A)
    assert rec is not None
    assert (rec["operational_state"], rec["attestation_count"], json.loads(rec["meta_data"])) == (
        records.TENANT_FAILED, 41, {"old": OLD_A[-4:]})
    assert (await rv.call("GET", "/agents/"))["results"] == {"uuids": [[OLD_A], [OLD_B]]}
    # and the new schema is usable: OLD_B was resumed (GET_QUOTE), cannot be reached -> FAILED,
    # its notice is stored in the new outbox tables with a pending delivery to each old agent
    rec_b = await rv.wait_state(OLD_B, records.FAILED)
    assert rec_b["attestation_count"] == 41  # counters never go back
    rec = await rv.wait(OLD_A, lambda r: r["pending_notices"] == 1)
    await rv.call("PUT", f"/agents/{OLD_A}/reactivate")  # a state change on the migrated row
    await rv.call("DELETE", f"/agents/{OLD_A}")
    await rv.stop()
    engine = _engine(db_url)
    try:
        with engine.connect() as conn:
            assert current(conn, VERIFIER) == "v0005"
    finally:
        engine.dispose()


async def test_auto_migrate_off_refuses_old_schema_until_db_upgrade(
    nursery: trio.Nursery, tmp_path: Path, pki: Any
) -> None:
    data = tmp_path / "v"
    data.mkdir()
    url = f"sqlite:///{data / 'verifier.sqlite'}"
    _make_first_revision_db(url, pki)
    with pytest.raises(StartupError, match="db upgrade") as info:
        await start_verifier(nursery, pki, data, auto_migrate_db=False)
    assert info.value.code == Exit.SCHEMA and isinstance(info.value.__cause__, SchemaOutOfDate)

    # keytrio verifier db upgrade --config F (the real command line, in a subprocess)
    opts = verifier_options(pki, data, auto_migrate_db=False)
    cfg = tmp_path / "verifier.toml"
    cfg.write_text("[verifier]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items()))
    keytrio = Path(sys.executable).with_name("keytrio")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(keytrio), "verifier", "--config", str(cfg)], capture_output=True, text=True, timeout=60, env=env))
    assert (out.returncode, len(out.stderr.splitlines())) == (Exit.SCHEMA, 1), out.stderr
    assert "db upgrade" in out.stderr
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(keytrio), "verifier", "db", "upgrade", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, env=env))
    assert out.returncode == 0, out.stderr
    assert "v0001 -> v0005" in out.stdout

    rv = await start_verifier(nursery, pki, data, auto_migrate_db=False)
    rec = await rv.get(OLD_A)
    assert rec is not None and rec["attestation_count"] == 41
    await rv.stop()


async def test_registrar_first_revision_with_data(tmp_path: Path, pki: Any, db_url: str) -> None:  # noqa: F811
    soft = SoftTpm.new()
    engine = _engine(db_url)
    try:
        upgrade(engine, REGISTRAR, "r0001")
        old = sa.MetaData()
        old.reflect(engine)
        with engine.begin() as conn:
            conn.execute(old.tables["registrar_agents"].insert().values(
                agent_id=OLD_A, ek_tpm=soft.ek_tpm, ekcert=None, aik_tpm=soft.aik_tpm, mtls_cert=pki.agent.pem,
                ip="127.0.0.1", port=9002, regcount=3, active=True, auth_tag="ab" * 48, pending_tag=None,
                pending_deadline=None, pending_mtls_cert=None, pending_ip=None, pending_port=None,
                registered_at=1.0, activated_at=2.0))
            # r0001-era code deactivated an agent while its re-registration awaited activation
            conn.execute(old.tables["registrar_agents"].insert().values(
                agent_id=OLD_C, ek_tpm=soft.ek_tpm, ekcert=None, aik_tpm=soft.aik_tpm, mtls_cert=pki.agent.pem,
                ip="127.0.0.1", port=9003, regcount=1, active=False, auth_tag="cd" * 48,
                pending_tag=credential.activation_auth_tag(b"c" * 32, OLD_C), pending_deadline=time.time() + 3600,
                pending_mtls_cert=pki.agent.pem, pending_ip="127.0.0.1", pending_port=9004,
                registered_at=1.0, activated_at=2.0))
            conn.execute(sa.text(f"DROP TABLE {REGISTRAR.version_table}"))  # made by create_all
    finally:
        engine.dispose()
    config = registrar_config(pki, tmp_path / "r", database_url=db_url)
    async with running_registrar(config, pki) as reg:
        r = await reg.record(OLD_A)
        assert r.status_code == 200, r.text
        rec = r.json()["results"]
        assert (rec["regcount"], rec["port"], rec["aik_tpm"]) == (3, 9002, soft.aik_tpm)
        # r0002: the re-registering agent answers with its activated record again; still pending
        rec = (await reg.record(OLD_C)).json()["results"]
        assert (rec["regcount"], rec["port"]) == (1, 9003)
        assert (await reg.activate(OLD_C, credential.activation_auth_tag(b"c" * 32, OLD_C))).status_code == 200
        rec = (await reg.record(OLD_C)).json()["results"]
        assert (rec["regcount"], rec["port"]) == (2, 9004)
        # and a new registration works next to it (SoftTpm round trip)
        await reg.enroll(OLD_B, SoftTpm.new())
        assert (await reg.record(OLD_B)).status_code == 200
