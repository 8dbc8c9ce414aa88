"""Store access for the verifier's agent table (schema.py); every write is one committed transaction.

Rows come back as plain dicts (column name -> value; JSON columns still as text: callers decode).
Functions that address one agent return False/None when it does not exist, so a monitor racing a
DELETE simply finds its row gone.

Cluster mode (leases.py): a monitor's writes (:func:`record_success`, :func:`record_failure`,
:func:`update_if_state`) are *fenced*: they apply only while this instance still holds the agent's
lease at the epoch it claimed, tested in the write's own WHERE (``EXISTS`` on the lease row, taken
``FOR KEY SHARE``: a claim by another instance, ``SELECT ... FOR UPDATE``, either waits for the
write's commit or makes the write match no row). The fence is a context variable the cluster sets
(:func:`fenced`) when it starts a monitor; the monitor's task and every task it spawns inherit it.
Without one (single-process verifier, REST routes) the statements are the unfenced ones.
"""

from __future__ import annotations

import contextvars
import json
import operator
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import GroupedWrite, Store
from keytrio.actors.verifier.schema import agents, deliveries, leases
from keytrio.protocol.quote import ClockInfo
from keytrio.protocol.states import (  # noqa: F401 -- re-exported: the verifier reads records.GET_QUOTE etc.
    FAILED,
    GET_QUOTE,
    GET_QUOTE_RETRY,
    INVALID_QUOTE,
    PROVIDE_V,
    PROVIDE_V_RETRY,
    REGISTERED,
    SAVED,
    START,
    TENANT_FAILED,
    TERMINATED,
)


class DuplicateAgent(Exception):
    """An agent with this id is already enrolled."""


def _where(agent_id: str) -> Any:
    return agents.c.agent_id == agent_id


@dataclass(frozen=True)
class Fence:
    """The lease a monitor runs under: its instance's id and the epoch of its claim."""

    holder: str
    epoch: int


_FENCE: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("keytrio_verifier_fence", default=None)


@contextmanager
def fenced(fence: Fence | None) -> Iterator[None]:
    """Tasks started inside (``nursery.start_soon`` copies the context) write under ``fence``."""
    token = _FENCE.set(fence)
    try:
        yield
    finally:
        _FENCE.reset(token)


def current_fence() -> Fence | None:
    return _FENCE.get()


def _lease_held(holder: Any, epoch: Any) -> Any:
    # FOR KEY SHARE: does not block the holder's own renewal (UPDATE of non-key columns), but a
    # claim's SELECT ... FOR UPDATE skips the row until this write commits; a write that starts
    # after a claim committed sees the new holder (READ COMMITTED re-reads it) and matches nothing.
    return sa.exists(
        sa.select(sa.literal_column("1")).select_from(leases)
        .where(leases.c.kind == sa.literal_column("'agent'"), leases.c.name == agents.c.agent_id,
               leases.c.holder == holder, leases.c.epoch == epoch)
        .with_for_update(read=True, key_share=True)
    )


def _fence_cond(fence: Fence | None) -> Any:
    return sa.true() if fence is None else _lease_held(fence.holder, fence.epoch)


def _one(conn: Connection, agent_id: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(agents).where(_where(agent_id))).mappings().first()
    return dict(row) if row is not None else None


async def add(store: Store, values: dict[str, Any]) -> None:
    """Insert a new enrolment (``values`` = column values incl. agent_id); DuplicateAgent if known."""

    def txn(conn: Connection) -> bool:
        if _one(conn, values["agent_id"]) is not None:
            return False
        conn.execute(sa.insert(agents).values(**values))
        return True

    try:
        inserted = await store.write(txn)
    except sa.exc.IntegrityError:  # a concurrent enrolment of the same id won the race
        raise DuplicateAgent(values["agent_id"]) from None
    if not inserted:
        raise DuplicateAgent(values["agent_id"])


async def get(store: Store, agent_id: str) -> dict[str, Any] | None:
    return await store.read(lambda conn: _one(conn, agent_id))


async def list_ids(store: Store, verifier_id: str | None = None) -> list[str]:
    """Agent ids (sorted), of one verifier if ``verifier_id`` is given."""

    def q(conn: Connection) -> list[str]:
        stmt = sa.select(agents.c.agent_id).order_by(agents.c.agent_id)
        if verifier_id is not None:
            stmt = stmt.where(agents.c.verifier_id == verifier_id)
        return [r[0] for r in conn.execute(stmt)]

    return await store.read(q)


async def list_all(store: Store, verifier_id: str | None = None) -> list[dict[str, Any]]:
    """Full rows (sorted by id), of one verifier if ``verifier_id`` is given."""

    def q(conn: Connection) -> list[dict[str, Any]]:
        stmt = sa.select(agents).order_by(agents.c.agent_id)
        if verifier_id is not None:
            stmt = stmt.where(agents.c.verifier_id == verifier_id)
        return [dict(r) for r in conn.execute(stmt).mappings()]

    return await store.read(q)


async def delete(store: Store, agent_id: str) -> bool:
    def txn(conn: Connection) -> int:
        return conn.execute(sa.delete(agents).where(_where(agent_id))).rowcount

    return bool(await store.write(txn))


async def update(store: Store, agent_id: str, **values: Any) -> bool:
    """Set columns of one agent; False if it is not enrolled (any more)."""

    def txn(conn: Connection) -> int:
        return conn.execute(sa.update(agents).where(_where(agent_id)).values(**values)).rowcount

    return bool(await store.write(txn))


async def set_state(store: Store, agent_id: str, state: int, **values: Any) -> bool:
    return await update(store, agent_id, operational_state=state, **values)


#: what a reactivate resets: a fresh start (NK, IMA from entry 0, clock, V re-delivered)
RESET_PROGRESS: dict[str, Any] = {
    "v_delivered": False, "next_ima_ml_entry": 0, "ima_pcr10": "{}", "tpm_clock_info": None, "ima_progress": None,
}


async def reactivate(store: Store, agent_id: str) -> bool:
    """GET_QUOTE with the monitor's progress reset, in one transaction; False if unknown."""
    return await set_state(store, agent_id, GET_QUOTE, **RESET_PROGRESS)


async def pending_notices(store: Store, agent_ids: Collection[str]) -> dict[str, int]:
    """Revocation deliveries still pending per recipient agent (absent = 0)."""

    def q(conn: Connection) -> dict[str, int]:
        stmt = (sa.select(deliveries.c.recipient, sa.func.count())
                .where(deliveries.c.state == "pending", deliveries.c.recipient.in_(list(agent_ids)))
                .group_by(deliveries.c.recipient))
        return {r: int(n) for r, n in conn.execute(stmt)}

    return await store.read(q) if agent_ids else {}


def _guard(agent_id: str, only_in_states: Collection[int] | None) -> Any:
    # A monitor's write must not undo a concurrent tenant action (stop -> 10, delete): its
    # writes apply only while the row is still in a state the monitor owns.
    cond = _where(agent_id)
    if only_in_states is not None:
        cond = sa.and_(cond, agents.c.operational_state.in_(list(only_in_states)))
    return cond


async def update_if_state(store: Store, agent_id: str, only_in_states: Collection[int], **values: Any) -> bool:
    """Like :func:`update`, but only while the agent's state is one of ``only_in_states``."""

    fence = _FENCE.get()

    def txn(conn: Connection) -> int:
        cond = _guard(agent_id, only_in_states)
        if fence is not None:
            cond = sa.and_(cond, _fence_cond(fence))
        return conn.execute(sa.update(agents).where(cond).values(**values)).rowcount

    return bool(await store.write(txn))


def _success_sql(
    dialect: sa.Dialect, columns: tuple[str, ...], states: tuple[int, ...] | None, fence: bool
) -> tuple[str, tuple[str, ...] | None]:
    """The success UPDATE for these columns, compiled for ``dialect``: the driver SQL and its bind
    names in order (None for a named paramstyle). :func:`_success_statement` keeps the result,
    since building and compiling it per poll cost more than the rest of the poll's database work."""
    c = agents.c
    cond = c.agent_id == sa.bindparam("p_agent_id")
    if states is not None:  # literal ints: no "expanding" IN parameter to render per call
        cond = sa.and_(cond, c.operational_state.in_([sa.literal_column(str(int(x))) for x in states]))
    if fence:
        cond = sa.and_(cond, _lease_held(sa.bindparam("p_fence_holder"), sa.bindparam("p_fence_epoch")))
    values: dict[str, Any] = {"attestation_count": c.attestation_count + sa.literal_column("1")}
    values.update({name: sa.bindparam(f"p_{name}") for name in columns})
    compiled = sa.update(agents).where(cond).values(**values).compile(dialect=dialect)
    return compiled.string, tuple(compiled.positiontup or ()) if compiled.positional else None


#: record_success's values, in the order of its ``values`` tuple (p_<name> in the statement)
_SUCCESS_VALUES = ("last_received_quote", "last_successful_attestation", "hash_alg", "enc_alg", "sign_alg",
                   "next_ima_ml_entry", "ima_pcr10", "ima_progress", "boottime", "tpm_clock_info",
                   "operational_state", "agent_id", "fence_holder", "fence_epoch")
_SUCCESS_OPTIONAL = _SUCCESS_VALUES[2:11]
_SUCCESS_AT = {f"p_{name}": i for i, name in enumerate(_SUCCESS_VALUES)}
#: (dialect, optional columns set, guard states, fenced) -> (driver SQL, values tuple -> driver
#: parameters): the success UPDATE is compiled once per key
_SUCCESS_STATEMENTS: dict[tuple[str, tuple[bool, ...], tuple[int, ...] | None, bool],
                          tuple[str, Callable[[tuple[Any, ...]], Any]]] = {}


def _success_statement(
    dialect: sa.Dialect, present: tuple[bool, ...], states: tuple[int, ...] | None, fenced: bool
) -> tuple[str, Callable[[tuple[Any, ...]], Any]]:
    """The success UPDATE for the optional columns set in ``present`` and how to take its driver
    parameters out of record_success's values tuple: positionally, one C call in the statement's
    order (building a dict per poll and a tuple out of it was most of the write's Python), or
    for a named paramstyle a dict of the names the statement has."""
    key = (dialect.name, present, states, fenced)
    hit = _SUCCESS_STATEMENTS.get(key)
    if hit is None:
        columns = _SUCCESS_VALUES[:2] + tuple(name for name, on in zip(_SUCCESS_OPTIONAL, present, strict=True) if on)
        sql, order = _success_sql(dialect, columns, states, fenced)
        if order is not None:
            at = [_SUCCESS_AT[name] for name in order]
            getter = operator.itemgetter(*at)
            pick: Callable[[tuple[Any, ...]], Any] = getter if len(at) > 1 else (lambda v: (getter(v),))
        else:
            named = [(f"p_{name}", _SUCCESS_AT[f"p_{name}"]) for name in (*columns, "agent_id")]
            if fenced:
                named += [(n, _SUCCESS_AT[n]) for n in ("p_fence_holder", "p_fence_epoch")]

            def pick(v: tuple[Any, ...], named: list[tuple[str, int]] = named) -> Any:
                return {name: v[i] for name, i in named}
        hit = _SUCCESS_STATEMENTS[key] = (sql, pick)
    return hit


_STATES_KEYS: dict[frozenset[int], tuple[int, ...]] = {}


def _states_key(only_in_states: Collection[int] | None) -> tuple[int, ...] | None:
    if only_in_states is None:
        return None
    if isinstance(only_in_states, frozenset):  # the monitor's ACTIVE_STATES: sorted once
        hit = _STATES_KEYS.get(only_in_states)
        if hit is None:
            hit = _STATES_KEYS[only_in_states] = tuple(sorted(only_in_states))
        return hit
    return tuple(sorted(only_in_states))


def submit_success(
    store: Store,
    agent_id: str,
    *,
    nursery: trio.Nursery | None = None,
    now: float,
    hash_alg: str | None = None,
    enc_alg: str | None = None,
    sign_alg: str | None = None,
    next_ima_ml_entry: int | None = None,
    ima_pcr10: dict[str, str] | None = None,
    ima_progress: str | None = None,
    boottime: int | None = None,
    clock_info: ClockInfo | dict[str, Any] | None = None,
    state: int | None = None,
    only_in_states: Collection[int] | None = None,
) -> GroupedWrite:
    """:func:`record_success` queued without waiting (``Store.submit_grouped``, committer task in
    ``nursery``): ``await store.collect(w)`` gives its rowcount (0: not written), ``store.drop(w)``
    takes it back while its group has not started. The fence is the caller's, taken now."""
    stamp = int(now)
    if isinstance(clock_info, ClockInfo):
        clock_text: str | None = clock_info.json_text()
    else:
        clock_text = json.dumps(clock_info, sort_keys=True) if clock_info is not None else None
    pcr10_text = json.dumps(ima_pcr10, sort_keys=True) if ima_pcr10 is not None else None
    fence = _FENCE.get()
    # the values in _SUCCESS_VALUES' order; which optional columns are set picks the statement
    values = (stamp, stamp, hash_alg, enc_alg, sign_alg, next_ima_ml_entry, pcr10_text, ima_progress, boottime,
              clock_text, state, agent_id, None if fence is None else fence.holder,
              None if fence is None else fence.epoch)
    present = (hash_alg is not None, enc_alg is not None, sign_alg is not None, next_ima_ml_entry is not None,
               pcr10_text is not None, ima_progress is not None, boottime is not None, clock_text is not None,
               state is not None)
    states = _states_key(only_in_states)
    fenced = fence is not None

    def txn(conn: Connection) -> int:
        sql, pick = _success_statement(conn.dialect, present, states, fenced)
        # the driver's own cursor: the statement is already compiled for this dialect's
        # paramstyle, and SQLAlchemy's execute path per row cost four times the UPDATE itself
        cur = conn.connection.cursor()
        try:
            cur.execute(sql, pick(values))
            return cur.rowcount
        finally:
            cur.close()

    return store.submit_grouped(txn, nursery)


async def record_success(store: Store, agent_id: str, **fields: Any) -> bool:
    """A quote verified: count it and keep the monitor's progress (a field None or left out =
    leave unchanged); ``fields`` are :func:`submit_success`'s keywords.

    ``only_in_states``: write nothing (return False) unless the row is in one of these states.
    One UPDATE, committed before this returns; concurrent calls (other agents' polls) share one
    transaction (``Store.write_grouped``): one thread hop and one fsync per group.
    """
    return bool(await store.collect(submit_success(store, agent_id, **fields)))


async def record_failure(
    store: Store,
    agent_id: str,
    *,
    state: int,
    event_id: str,
    severity_level: int,
    received_at: float | None = None,
    only_in_states: Collection[int] | None = None,
    also: Callable[[Connection], Any] | None = None,
) -> bool:
    """An attestation failed (policy or communication): new state and the worst event so far.

    ``received_at`` is given when a quote did arrive (it counts as last_received_quote).
    ``also(conn)`` runs in the same transaction once the row was updated (the monitor stores the
    revocation notice there: the failure and its notice commit together or not at all).
    Fenced (cluster mode): an instance that lost the lease records nothing and stages no notice.
    """
    fence = _FENCE.get()

    def txn(conn: Connection) -> int:
        row = _one(conn, agent_id)
        if row is None or (only_in_states is not None and row["operational_state"] not in only_in_states):
            return 0
        values: dict[str, Any] = {"operational_state": state}
        # severity_level/last_event_id reflect the worst event seen (upstream keeps the highest)
        if row["severity_level"] is None or severity_level >= row["severity_level"]:
            values.update(severity_level=severity_level, last_event_id=event_id)
        if received_at is not None:
            values["last_received_quote"] = int(received_at)
        cond = _where(agent_id) if fence is None else sa.and_(_where(agent_id), _fence_cond(fence))
        count = conn.execute(sa.update(agents).where(cond).values(**values)).rowcount
        if count and also is not None:
            also(conn)
        return count

    return bool(await store.write(txn))
