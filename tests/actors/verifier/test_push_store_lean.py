"""push/store.py's lean statements (SQLite, through the transaction's DBAPI connection) read and
write exactly what the same statements through SQLAlchemy do: the same cycle of operations runs
on two real SQLite databases, once each way, and every value read and every row left must match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.schema import agents, metadata, push_attestations, push_sessions
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

AID = "a0000000-0000-4000-8000-00000000000a"


def _agent() -> dict[str, Any]:
    row: dict[str, Any] = {}
    for c in agents.c:
        if isinstance(c.type, sa.Boolean):
            row[c.name] = True
        elif isinstance(c.type, sa.Integer | sa.Float):
            row[c.name] = 3
        else:
            row[c.name] = f"{c.name}-text"
    row.update(agent_id=AID, ip=None, port=None, operational_state=3, boottime=None, ima_progress=None)
    return row


def _cycle(engine: sa.Engine) -> list[Any]:
    """Everything the attestation cycle does, twelve times (history 5); -> what it read and got."""
    seen: list[Any] = []
    with engine.begin() as conn:
        conn.execute(sa.insert(agents).values(**_agent()))
        conn.execute(sa.insert(push_sessions).values(
            session_id="s1", agent_id=AID, challenge="n", challenges_expire_at=10.0, created_at=1.0,
            token_hash="h", token_expires_at=50.0, response_received_at=2.0))
    for i in range(12):
        with engine.begin() as conn:
            seen.append(pstore.session_row(conn, "s1"))
            seen.append(pstore.session_row(conn, "missing"))
            seen.append(pstore.agent_row(conn, AID))
            seen.append(pstore.latest_head_in(conn, AID))
            last = pstore.latest_in(conn, AID)
            seen.append(last)
            values = {"agent_id": AID, "stage": pstore.AWAITING, "evaluation": pstore.PENDING,
                      "challenge": f"c{i}", "hash_alg": "sha256", "evidence_requested": [{"i": i}],
                      "capabilities": [{"caps": True}], "system_info": {"boot_time": None},
                      "capabilities_received_at": float(i), "challenges_expire_at": i + 100.0}
            seen.append(pstore.insert_attestation(conn, values, last, history=5))
        with engine.begin() as conn:
            index = pstore.latest_in(conn, AID)["index"]  # type: ignore[index]
            seen.append(pstore.attestation_in(conn, AID, index))
            seen.append(pstore.attestation_in(conn, AID, 0))  # trimmed away after 5
            seen.append(pstore.set_evidence(conn, AID, index, [{"quote": i}], i + 0.5))
            seen.append(pstore.set_evidence(conn, AID, index, [{"quote": i}], i + 0.5))  # not twice
        with engine.begin() as conn:
            if i % 3 == 2:
                pstore.complete(conn, AID, index, evaluation=pstore.FAIL, now=i + 0.7,
                                failure_reason=pstore.POLICY_VIOLATION, failure_event="ima.x")
                continue
            seen.append(pstore.record_pass(conn, AID, 1000.0 + i, {"next_ima_ml_entry": i, "boottime": 7},
                                           (3, 4), 3))
            seen.append(pstore.record_pass(conn, AID, 1000.0 + i, {"next_ima_ml_entry": i}, (8,), 3))  # not active
            pstore.complete(conn, AID, index, evaluation=pstore.PASS, now=i + 0.6)
            pstore.extend_tokens(conn, AID, float(i), 40.0 + i)
    with engine.connect() as conn:
        for table in (agents, push_sessions, push_attestations):
            seen.append([dict(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key)).mappings()])
    return seen


def test_lean_statements_match_sqlalchemy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for name, lean in (("lean", True), ("plain", False)):
        engine = sa.create_engine(f"sqlite:///{tmp_path / name}.db")
        metadata.create_all(engine)
        used: list[bool] = []
        monkeypatch.setattr(pstore, "lean", lambda conn, lean=lean, used=used: used.append(lean) or lean)
        results.append(_cycle(engine))
        assert used and all(u is lean for u in used)
        engine.dispose()
    lean_seen, plain_seen = results
    assert len(lean_seen) == len(plain_seen)
    for got, want in zip(lean_seen, plain_seen, strict=True):
        assert got == want
        if isinstance(want, dict) and "v_delivered" in want:
            assert type(got["v_delivered"]) is bool  # Boolean columns come back as bool, as SQLAlchemy gives them
    assert len(lean_seen[-1]) == 5  # history bound kept
    assert {r["evaluation"] for r in lean_seen[-1]} == {pstore.PASS, pstore.FAIL}


def _settle_cycle(engine: sa.Engine, one_statement: bool) -> list[Any]:
    """Evidence stored and a pass completed: by set_evidence(completed=) (one statement) or by
    set_evidence then complete (two, the general path); refused when not awaiting either way."""
    seen: list[Any] = []
    row = _agent()
    for c in agents.c:  # within PostgreSQL's varchar lengths
        if isinstance(row[c.name], str) and getattr(c.type, "length", None):
            row[c.name] = row[c.name][: c.type.length]
    with engine.begin() as conn:
        conn.execute(sa.insert(agents).values(**row))
    for i in range(4):
        with engine.begin() as conn:
            last = pstore.latest_in(conn, AID)
            values = {"agent_id": AID, "stage": pstore.AWAITING, "evaluation": pstore.PENDING,
                      "challenge": f"c{i}", "hash_alg": "sha256", "evidence_requested": [{"i": i}],
                      "capabilities": [{"caps": True}], "system_info": {"boot_time": None},
                      "capabilities_received_at": float(i), "challenges_expire_at": i + 100.0}
            index = pstore.insert_attestation(conn, values, last, history=3)
        with engine.begin() as conn:
            evidence = [{"quote": i, "text": "é\u2028"}]
            fail = ((pstore.FAIL, i + 0.25, pstore.POLICY_VIOLATION, "ima.x") if i == 2
                    else (pstore.PASS, i + 0.25, None, None))
            if one_statement:
                done = pstore.completed(*fail)
                seen.append(pstore.set_evidence(conn, AID, index, evidence, i + 0.5, completed=done))
                # sent twice (the immutable race): refused by the stage condition, nothing written
                seen.append(pstore.set_evidence(conn, AID, index, [{"quote": -1}], 99.0, completed=done))
                seen.append(pstore.set_evidence(conn, AID, index, [{"quote": -1}], 99.0))
            else:
                seen.append(pstore.set_evidence(conn, AID, index, evidence, i + 0.5))
                pstore.complete(conn, AID, index, evaluation=fail[0], now=fail[1], failure_reason=fail[2],
                                failure_event=fail[3])
                seen.append(pstore.set_evidence(conn, AID, index, [{"quote": -1}], 99.0))
                seen.append(pstore.set_evidence(conn, AID, index, [{"quote": -1}], 99.0))
            seen.append(pstore.attestation_in(conn, AID, index))
    with engine.connect() as conn:
        seen.append([dict(r) for r in conn.execute(
            sa.select(push_attestations).order_by(*push_attestations.primary_key)).mappings()])
    return seen


def test_evidence_and_verdict_in_one_statement_match_the_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str  # noqa: F811
) -> None:
    """set_evidence(completed=pstore.completed(...)) writes the row set_evidence + complete wrote,
    and returns what they returned (SQLite: lean and through SQLAlchemy; PostgreSQL)."""
    for lean in ((True, False) if db_url.startswith("sqlite") else (False,)):
        results = []
        for n, one in enumerate((True, False)):
            url = f"sqlite:///{tmp_path / f'{lean}-{n}'}.db" if db_url.startswith("sqlite") else db_url
            engine = sa.create_engine(url)
            metadata.drop_all(engine)
            metadata.create_all(engine)
            if db_url.startswith("sqlite"):
                monkeypatch.setattr(pstore, "lean", lambda conn, lean=lean: lean)
            results.append(_settle_cycle(engine, one))
            engine.dispose()
        one_seen, two_seen = results
        assert one_seen == two_seen
        assert one_seen[:3] == [True, False, False]
        assert [r["stage"] for r in one_seen[-1]] == [pstore.COMPLETE] * 3
        assert [r["evaluation"] for r in one_seen[-1]] == [pstore.PASS, pstore.FAIL, pstore.PASS]


def test_session_and_agent_in_one_statement_match_the_two_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str  # noqa: F811
) -> None:
    """session_and_agent = (session_row, agent_row) (the agent None without the session) for a
    session of the agent, of another agent, of no agent enrolled, and no session (SQLite: lean and
    through SQLAlchemy; PostgreSQL)."""
    other = "b0000000-0000-4000-8000-00000000000b"
    for lean in ((True, False) if db_url.startswith("sqlite") else (False,)):
        url = f"sqlite:///{tmp_path / f'join-{lean}'}.db" if db_url.startswith("sqlite") else db_url
        engine = sa.create_engine(url)
        metadata.drop_all(engine)
        metadata.create_all(engine)
        if db_url.startswith("sqlite"):
            monkeypatch.setattr(pstore, "lean", lambda conn, lean=lean: lean)
        row = _agent()
        for c in agents.c:  # within PostgreSQL's varchar lengths
            if isinstance(row[c.name], str) and getattr(c.type, "length", None):
                row[c.name] = row[c.name][: c.type.length]
        with engine.begin() as conn:
            conn.execute(sa.insert(agents).values(**row))
            conn.execute(sa.insert(agents).values(**{**row, "agent_id": other, "v_delivered": False,
                                                     "ip": "10.0.0.1", "boottime": 5}))
            for sid, aid in (("s1", AID), ("s2", other), ("s3", "c0000000-0000-4000-8000-00000000000c")):
                conn.execute(sa.insert(push_sessions).values(
                    session_id=sid, agent_id=aid, challenge="n", challenges_expire_at=10.0, created_at=1.0,
                    token_hash=None if sid == "s3" else "h" + sid, token_expires_at=50.0, response_received_at=2.0))
        seen = 0
        with engine.begin() as conn:
            for sid in ("s1", "s2", "s3", "missing"):
                for aid in (AID, other, "c0000000-0000-4000-8000-00000000000c"):
                    session, agent = pstore.session_and_agent(conn, sid, aid)
                    want_session = pstore.session_row(conn, sid)
                    want_agent = pstore.agent_row(conn, aid) if want_session is not None else None
                    assert session == want_session and agent == want_agent
                    assert list(session or {}) == list(want_session or {})
                    assert list(agent or {}) == list(want_agent or {})
                    if agent is not None:
                        assert type(agent["v_delivered"]) is bool
                        seen += 1
        assert seen == 6
        engine.dispose()
