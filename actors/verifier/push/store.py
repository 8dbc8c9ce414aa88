"""Rows of the push model: PoP sessions and the attestation history (schema.py, migration v0004).

The ``async`` functions are one committed transaction each; the plain ones run in the caller's
transaction (the attestation cycle checks token, agent and latest attestation and writes in ONE
transaction per request: attestations.py). JSON columns are text (callers decode). Attestation
rows come back as dicts with ``index`` (= ``idx``) and the JSON columns decoded.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier.schema import agents, push_attestations, push_sessions

AWAITING, EVALUATING, COMPLETE = "awaiting_evidence", "evaluating_evidence", "verification_complete"
PENDING, PASS, FAIL = "pending", "pass", "fail"
BROKEN_CHAIN, POLICY_VIOLATION = "broken_evidence_chain", "policy_violation"

_JSON_COLUMNS = ("evidence_requested", "capabilities", "system_info", "evidence")
S, A = push_sessions.c, push_attestations.c
_bp = sa.bindparam

# The statements of the attestation cycle, built once: SQLAlchemy then reuses their cache keys and
# compiled forms (building and keying a statement per call cost more than running it).
_SESSION = sa.select(push_sessions).where(S.session_id == _bp("p_sid"))
_AGENT = sa.select(agents).where(agents.c.agent_id == _bp("p_aid"))
# the cycle's gate (service.PushService.admit) reads the token's session and the agent together: the
# session's columns by name, the agent's prefixed (both have agent_id); the agent's are NULL when
# there is no agent of that id, and there is no row when there is no such session
_AGENT_PREFIX = "agent__"
_SESSION_AGENT = (sa.select(*push_sessions.c, *[c.label(_AGENT_PREFIX + c.key) for c in agents.c])
                  .select_from(push_sessions.outerjoin(agents, agents.c.agent_id == _bp("p_aid")))
                  .where(S.session_id == _bp("p_sid")))
_LATEST = sa.select(push_attestations).where(A.agent_id == _bp("p_aid")).order_by(A.idx.desc()).limit(1)
# what the capabilities phase needs of the previous attestation (not its evidence, decoded for nothing)
_LATEST_HEAD = (sa.select(A.idx, A.stage, A.evidence_received_at).where(A.agent_id == _bp("p_aid"))
                .order_by(A.idx.desc()).limit(1))
_ATTESTATION = sa.select(push_attestations).where(A.agent_id == _bp("p_aid"), A.idx == _bp("p_idx"))
_INSERT = sa.insert(push_attestations)
_TRIM = sa.delete(push_attestations).where(A.agent_id == _bp("p_aid"), A.idx <= _bp("p_upto"))
_SET_EVIDENCE = sa.update(push_attestations).where(
    A.agent_id == _bp("p_aid"), A.idx == _bp("p_idx"), A.stage == AWAITING,
).values(stage=EVALUATING, evidence=_bp("p_evidence"), evidence_received_at=_bp("p_now"))
#: the columns :func:`complete` writes (their values: :func:`completed`), bound as ``p_<column>``
_COMPLETED = ("stage", "evaluation", "failure_reason", "failure_event", "verification_completed_at")
_COMPLETE = sa.update(push_attestations).where(
    A.agent_id == _bp("p_aid"), A.idx == _bp("p_idx"), A.stage == EVALUATING,
).values(**{k: _bp(f"p_{k}") for k in _COMPLETED})
# the evidence stored and the attestation completed in one statement (a pass settled in the
# evidence transaction): _SET_EVIDENCE's condition and values, then _COMPLETE's values
_SET_EVIDENCE_COMPLETE = sa.update(push_attestations).where(
    A.agent_id == _bp("p_aid"), A.idx == _bp("p_idx"), A.stage == AWAITING,
).values(evidence=_bp("p_evidence"), evidence_received_at=_bp("p_now"), **{k: _bp(f"p_{k}") for k in _COMPLETED})
_EXTEND = sa.update(push_sessions).where(
    S.agent_id == _bp("p_aid"), S.token_hash.isnot(None), S.token_expires_at >= _bp("p_now"),
    S.token_expires_at < _bp("p_until"),
).values(token_expires_at=_bp("p_until"))



class _Lean:
    """One of the cycle's statements, run on SQLite through the transaction's own DBAPI
    connection: compiled once (per column set for an INSERT), its rows turned into dicts with
    SQLAlchemy's own result processors (bool for Boolean columns). SQLAlchemy's per-execution
    work (cache key, parameter and result objects) cost 100-180 us a statement, 3-5x the
    statement itself, and an attestation runs a dozen. Same SQL, same transaction (the
    connection's), so nothing changes for commits and rollbacks. Other databases run ``stmt``
    through SQLAlchemy as before."""

    __slots__ = ("_compiled", "columns", "stmt")

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self.columns = [c.key for c in stmt.selected_columns] if isinstance(stmt, sa.Select) else []
        self._compiled: dict[Any, tuple[str, list[str], dict[str, Any], list[tuple[int, Any]]]] = {}

    def _for(self, dialect: Any, keys: tuple[str, ...] | None) -> tuple[str, list[str], dict[str, Any],
                                                                         list[tuple[int, Any]]]:
        got = self._compiled.get(keys)
        if got is None:
            compiled = self.stmt.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
            fixed = {k: b.value for k, b in compiled.binds.items() if not b.required}
            procs = []
            if isinstance(self.stmt, sa.Select):
                for i, col in enumerate(self.stmt.selected_columns):
                    proc = col.type._cached_result_processor(dialect, None)
                    if proc is not None:
                        procs.append((i, proc))
            got = (compiled.string, list(compiled.positiontup or ()), fixed, procs)
            self._compiled[keys] = got
        return got

    def run(self, conn: Connection, params: dict[str, Any], *, keys: tuple[str, ...] | None = None) -> Any:
        """The DBAPI cursor of the executed statement (SQLite only: see :func:`lean`)."""
        sql, order, fixed, _ = self._for(conn.dialect, keys)
        cur = conn.connection.cursor()
        cur.execute(sql, tuple(params[k] if k in params else fixed[k] for k in order))
        return cur

    def first(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any] | None:
        """The first row as a dict (SQLite), or None."""
        _, _, _, procs = self._for(conn.dialect, None)
        cur = self.run(conn, params)
        try:
            row = cur.fetchone()
        finally:
            cur.close()
        if row is None:
            return None
        if procs:
            row = list(row)
            for i, proc in procs:
                row[i] = proc(row[i])
        return dict(zip(self.columns, row, strict=True))

    def rowcount(self, conn: Connection, params: dict[str, Any], *, keys: tuple[str, ...] | None = None) -> int:
        cur = self.run(conn, params, keys=keys)
        try:
            return int(cur.rowcount)
        finally:
            cur.close()


def lean(conn: Connection) -> bool:
    """The cycle's statements bypass SQLAlchemy's execution layer on SQLite (:class:`_Lean`)."""
    return conn.dialect.name == "sqlite"


_L_SESSION, _L_AGENT, _L_LATEST, _L_ATTESTATION = _Lean(_SESSION), _Lean(_AGENT), _Lean(_LATEST), _Lean(_ATTESTATION)
_L_INSERT, _L_TRIM, _L_SET_EVIDENCE = _Lean(_INSERT), _Lean(_TRIM), _Lean(_SET_EVIDENCE)
_L_COMPLETE, _L_EXTEND, _L_LATEST_HEAD = _Lean(_COMPLETE), _Lean(_EXTEND), _Lean(_LATEST_HEAD)
_L_SET_EVIDENCE_COMPLETE, _L_SESSION_AGENT = _Lean(_SET_EVIDENCE_COMPLETE), _Lean(_SESSION_AGENT)
_SESSION_KEYS = tuple(c.key for c in push_sessions.c)
_AGENT_KEYS = tuple((_AGENT_PREFIX + c.key, c.key) for c in agents.c)


# --- sessions --------------------------------------------------------------------------------------


async def add_session(store: Store, values: dict[str, Any], *, now: float, keep_per_agent: int,
                      max_pending: int) -> bool:
    """Insert a session; drop expired ones, and the agent's oldest beyond ``keep_per_agent``.
    False (nothing stored) when ``max_pending`` unanswered challenges are out already: the route
    is public, so a flood of made-up agent ids must not grow the table without bound."""

    def txn(conn: Connection) -> bool:
        conn.execute(sa.delete(push_sessions).where(
            S.challenges_expire_at < now,
            sa.or_(S.token_hash.is_(None), S.token_expires_at < now)))
        pending = conn.execute(sa.select(sa.func.count()).select_from(push_sessions).where(
            S.response_received_at.is_(None))).scalar_one()
        if pending >= max_pending:
            return False
        older = list(conn.execute(
            sa.select(S.session_id).where(S.agent_id == values["agent_id"])
            .order_by(S.created_at.desc()).offset(max(keep_per_agent - 1, 0))).scalars())
        if older:
            conn.execute(sa.delete(push_sessions).where(S.session_id.in_(older)))
        conn.execute(sa.insert(push_sessions).values(**values))
        return True

    return bool(await store.write(txn))


def session_row(conn: Connection, session_id: str) -> dict[str, Any] | None:
    if lean(conn):
        return _L_SESSION.first(conn, {"p_sid": session_id})
    row = conn.execute(_SESSION, {"p_sid": session_id}).mappings().first()
    return dict(row) if row is not None else None


async def get_session(store: Store, session_id: str) -> dict[str, Any] | None:
    return await store.read(lambda conn: session_row(conn, session_id))


def agent_row(conn: Connection, agent_id: str) -> dict[str, Any] | None:
    if lean(conn):
        return _L_AGENT.first(conn, {"p_aid": agent_id})
    row = conn.execute(_AGENT, {"p_aid": agent_id}).mappings().first()
    return dict(row) if row is not None else None


def session_and_agent(conn: Connection, session_id: str,
                      agent_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(session_row(conn, session_id), agent_row(conn, agent_id))`` in one statement, except that
    without the session the agent is not read (None): the token is refused before the agent is
    looked at (service.PushService.admit)."""
    params = {"p_sid": session_id, "p_aid": agent_id}
    if lean(conn):
        got = _L_SESSION_AGENT.first(conn, params)
    else:
        row = conn.execute(_SESSION_AGENT, params).mappings().first()
        got = dict(row) if row is not None else None
    if got is None:
        return None, None
    session = {k: got[k] for k in _SESSION_KEYS}
    if got[_AGENT_PREFIX + "agent_id"] is None:  # the primary key: NULL only when no agent joined
        return session, None
    return session, {k: got[label] for label, k in _AGENT_KEYS}


async def prove_session(store: Store, session_id: str, *, token_hash: str, now: float, expires_at: float) -> bool:
    """Store the token's hash; False when the session was answered before (one proof per session)."""

    def txn(conn: Connection) -> int:
        return conn.execute(
            sa.update(push_sessions).where(S.session_id == session_id, S.response_received_at.is_(None))
            .values(token_hash=token_hash, token_expires_at=expires_at, response_received_at=now)).rowcount

    return bool(await store.write(txn))


async def mark_answered(store: Store, session_id: str, now: float) -> None:
    def txn(conn: Connection) -> None:
        conn.execute(sa.update(push_sessions).where(S.session_id == session_id, S.response_received_at.is_(None))
                     .values(response_received_at=now))

    await store.write(txn)


def extend_tokens(conn: Connection, agent_id: str, now: float, until: float) -> None:
    """Valid tokens of ``agent_id`` live until ``until`` (a passed attestation; in the caller's txn)."""
    params = {"p_aid": agent_id, "p_now": now, "p_until": until}
    if lean(conn):
        _L_EXTEND.rowcount(conn, params)
        return
    conn.execute(_EXTEND, params)


# --- attestations ----------------------------------------------------------------------------------


def _decode(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["index"] = out.pop("idx")
    for name in _JSON_COLUMNS:
        if out.get(name) is not None:
            out[name] = json.loads(out[name])
    return out


def latest_in(conn: Connection, agent_id: str) -> dict[str, Any] | None:
    if lean(conn):
        got = _L_LATEST.first(conn, {"p_aid": agent_id})
        return _decode(got) if got is not None else None
    row = conn.execute(_LATEST, {"p_aid": agent_id}).mappings().first()
    return _decode(row) if row is not None else None


def latest_head_in(conn: Connection, agent_id: str) -> dict[str, Any] | None:
    """The agent's latest attestation's ``index``, ``stage`` and ``evidence_received_at`` only."""
    if lean(conn):
        got = _L_LATEST_HEAD.first(conn, {"p_aid": agent_id})
    else:
        row = conn.execute(_LATEST_HEAD, {"p_aid": agent_id}).mappings().first()
        got = dict(row) if row is not None else None
    if got is not None:
        got["index"] = got.pop("idx")
    return got


async def latest(store: Store, agent_id: str) -> dict[str, Any] | None:
    return await store.read(lambda conn: latest_in(conn, agent_id))


def attestation_in(conn: Connection, agent_id: str, index: int) -> dict[str, Any] | None:
    if lean(conn):
        got = _L_ATTESTATION.first(conn, {"p_aid": agent_id, "p_idx": index})
        return _decode(got) if got is not None else None
    row = conn.execute(_ATTESTATION, {"p_aid": agent_id, "p_idx": index}).mappings().first()
    return _decode(row) if row is not None else None


async def get_attestation(store: Store, agent_id: str, index: int) -> dict[str, Any] | None:
    return await store.read(lambda conn: attestation_in(conn, agent_id, index))


async def list_attestations(store: Store, agent_id: str) -> list[dict[str, Any]]:
    """Newest first (as upstream's documented list)."""

    def q(conn: Connection) -> list[dict[str, Any]]:
        rows = conn.execute(sa.select(push_attestations).where(A.agent_id == agent_id).order_by(A.idx.desc()))
        return [_decode(r) for r in rows.mappings()]

    return await store.read(q)


async def evaluating(store: Store, verifier_id: str) -> list[tuple[str, int]]:
    """(agent, index) of evidence accepted but not yet verified (a restart resumes them)."""

    def q(conn: Connection) -> list[tuple[str, int]]:
        stmt = (sa.select(A.agent_id, A.idx).join(agents, agents.c.agent_id == A.agent_id)
                .where(A.stage == EVALUATING, agents.c.verifier_id == verifier_id))
        return [(a, int(i)) for a, i in conn.execute(stmt)]

    return await store.read(q)


async def add_attestation(store: Store, values: dict[str, Any], *, history: int) -> int | None:
    """Insert the agent's next attestation (index = latest + 1, 0 first) and drop the oldest beyond
    ``history``; returns the index, or None when the latest is still being verified (the caller
    answers 503; checked in this transaction so two concurrent POSTs cannot both pass)."""

    def txn(conn: Connection) -> int | None:
        last = latest_in(conn, values["agent_id"])
        if last is not None and last["stage"] == EVALUATING:
            return None
        return insert_attestation(conn, values, last, history=history)

    return await store.write(txn)


def insert_attestation(conn: Connection, values: dict[str, Any], last: dict[str, Any] | None, *,
                       history: int) -> int:
    """Insert after ``last`` (the agent's latest, read in this transaction), trim to ``history``."""
    index = 0 if last is None else last["index"] + 1
    row = {k: (json.dumps(v) if k in _JSON_COLUMNS and v is not None else v) for k, v in values.items()}
    row["idx"] = index
    trim = {"p_aid": values["agent_id"], "p_upto": index - max(history, 1)}
    if lean(conn):
        _L_INSERT.rowcount(conn, row, keys=tuple(sorted(row)))
        if index >= max(history, 1):
            _L_TRIM.rowcount(conn, trim)
        return index
    conn.execute(_INSERT, row)
    if index >= max(history, 1):
        conn.execute(_TRIM, trim)
    return index


async def submit_evidence(store: Store, agent_id: str, index: int, evidence: list[Any], now: float) -> bool:
    """awaiting_evidence -> evaluating_evidence with the evidence; False if no longer awaiting."""

    return await store.write(lambda conn: set_evidence(conn, agent_id, index, evidence, now))


def set_evidence(conn: Connection, agent_id: str, index: int, evidence: list[Any], now: float,
                 completed: dict[str, Any] | None = None) -> bool:
    """awaiting_evidence -> evaluating_evidence (in the caller's transaction); False if not awaiting.
    ``completed`` (what :func:`completed` gives): straight on to verification_complete with those
    columns in the same statement, as :func:`complete` would write them right after."""
    params = {"p_aid": agent_id, "p_idx": index, "p_evidence": json.dumps(evidence), "p_now": now}
    if completed is not None:
        params.update({f"p_{k}": completed[k] for k in _COMPLETED})
        if lean(conn):
            return bool(_L_SET_EVIDENCE_COMPLETE.rowcount(conn, params))
        return bool(conn.execute(_SET_EVIDENCE_COMPLETE, params).rowcount)
    if lean(conn):
        return bool(_L_SET_EVIDENCE.rowcount(conn, params))
    return bool(conn.execute(_SET_EVIDENCE, params).rowcount)


def completed(evaluation: str, now: float, failure_reason: str | None = None,
              failure_event: str | None = None) -> dict[str, Any]:
    """The columns of a completed attestation (what :func:`complete` writes; an answer that shows
    the attestation after it takes them from here)."""
    return {"stage": COMPLETE, "evaluation": evaluation, "failure_reason": failure_reason,
            "failure_event": failure_event, "verification_completed_at": now}


def complete(conn: Connection, agent_id: str, index: int, *, evaluation: str, now: float,
             failure_reason: str | None = None, failure_event: str | None = None) -> None:
    """evaluating_evidence -> verification_complete (in the caller's transaction)."""
    columns = completed(evaluation, now, failure_reason, failure_event)
    params = {"p_aid": agent_id, "p_idx": index, **{f"p_{k}": columns[k] for k in _COMPLETED}}
    if lean(conn):
        _L_COMPLETE.rowcount(conn, params)
        return
    conn.execute(_COMPLETE, params)


async def forget_agent(store: Store, agent_id: str) -> None:
    """A deleted agent: its sessions and history go too."""

    def txn(conn: Connection) -> None:
        conn.execute(sa.delete(push_sessions).where(S.agent_id == agent_id))
        conn.execute(sa.delete(push_attestations).where(A.agent_id == agent_id))

    await store.write(txn)


#: the columns a pass writes -> its agents UPDATE (built once per column set)
_PASSED: dict[tuple[str, ...], _Lean] = {}


def record_pass(conn: Connection, agent_id: str, now: float, values: dict[str, Any],
                active_states: tuple[int, ...], state: int) -> bool:
    """The agent's row after a passed attestation (counter, times, progress ``values``), only while
    it is in ``active_states``; False when it is not (stopped, failed or deleted meanwhile)."""
    columns = tuple(sorted(values))
    stmt = _PASSED.get(columns + tuple(map(str, active_states)))
    if stmt is None:
        c = agents.c
        stmt = sa.update(agents).where(
            c.agent_id == _bp("p_aid"),
            c.operational_state.in_([sa.literal_column(str(int(x))) for x in active_states]),
        ).values(attestation_count=c.attestation_count + sa.literal_column("1"),
                 last_received_quote=_bp("p_now"), last_successful_attestation=_bp("p_now"),
                 operational_state=sa.literal_column(str(int(state))),
                 **{name: _bp(f"p_{name}") for name in columns})
        stmt = _PASSED[columns + tuple(map(str, active_states))] = _Lean(stmt)
    params = {"p_aid": agent_id, "p_now": int(now), **{f"p_{k}": v for k, v in values.items()}}
    if lean(conn):
        return bool(stmt.rowcount(conn, params))
    return bool(conn.execute(stmt.stmt, params).rowcount)
