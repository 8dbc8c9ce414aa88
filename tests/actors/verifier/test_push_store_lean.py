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
