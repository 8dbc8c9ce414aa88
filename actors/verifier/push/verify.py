"""Verification of accepted push evidence, and the push agents' failures.

A steady-state cycle (what :func:`_small` accepts, with the agent's runtime policy loaded here) is
checked inside the transaction that stores its evidence (:meth:`Verifier.settle`, called by
attestations.py in the store's thread), and a pass is written there: the 202 follows the verdict.
Everything else (a failure found there, large evidence, a policy to load first, evidence left
unverified by a restart) goes through :meth:`Verifier.run` after the 202.

:meth:`Verifier.run` checks one attestation with the evidence core the pull monitor uses
(``protocol.evidence.verify``: quote signature by the AK, nonce = the attestation's challenge,
PCR selection and digest, clock against the last good quote, ``tpm_policy`` PCRs, measured boot,
the agent's IMA hook, kept in memory between passes: evalstate.py); every PCR requested must be in
the quote. A small one (re-read after a restart, or after its policy was loaded) is checked in the
event loop, a large one (a whole IMA list, a UEFI log) in a worker thread. Then, in ONE transaction
(group-committed with other agents' verdicts):

* pass: the attestation -> ``verification_complete``/``pass``; the agent's counters and progress
  (IMA line, PCR 10, clock, boot time) as the monitor writes them; the agent's valid tokens extended
  by ``session_lifetime``;
* fail: the agent -> Invalid Quote (9) with the worst failure, the attestation -> ``fail`` with
  ``failure_reason`` (``broken_evidence_chain`` when the quote or the evidence chain does not hold,
  ``policy_violation`` otherwise), and the revocation notice staged in the outbox.

:meth:`Verifier.timed_out` fails an agent whose deadline passed (state Failed (7), event
``internal.verifier.attestation_timeout``) and stages its notice the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.ima import AgentIma
from keytrio.actors.verifier.monitor import ACTIVE_STATES, ImaCheckFactory
from keytrio.actors.verifier.notify import Outbox, build_notice
from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.push.attestations import Accepted, boot_epoch
from keytrio.actors.verifier.push.evalstate import Enrolment, EvalStates, has_runtime_policy
from keytrio.protocol import evidence, push_wire
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.failures import Failure, Severity, worst
from keytrio.protocol.ima_eval import PCR_MISMATCH
from keytrio.protocol.quote import ParsedQuote, decode_attest
from keytrio.protocol.quote_check import INVALID_QUOTE, MISSING_PCRS, QUOTE_VALIDATION

log = logging.getLogger("keytrio.verifier")
_ACTIVE = tuple(sorted(ACTIVE_STATES))

TIMEOUT = "internal.verifier.attestation_timeout"
#: failures that mean the evidence itself does not hold together (the rest are policy violations)
_CHAIN_EVENTS = frozenset({QUOTE_VALIDATION, INVALID_QUOTE, MISSING_PCRS, PCR_MISMATCH,
                           "qoute_validation.invalid_hash_alg", "qoute_validation.invalid_sign_alg"})


class Outcome:
    """What the check found (built in the worker thread)."""

    def __init__(self, failures: list[Failure], reason: str | None, values: dict[str, Any]) -> None:
        self.failures = failures
        self.reason = reason
        self.values = values


def _reset_count(attest: bytes) -> int | None:
    try:
        return decode_attest(attest).clock.reset_count
    except ProtocolError:
        return None


def _requested(res: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for item in res["evidence_requested"]:
        if item["evidence_type"] == kind:
            return item["chosen_parameters"]
    return None


def check(row: dict[str, Any], res: dict[str, Any], ima_check_for: ImaCheckFactory | None) -> Outcome:
    """Verify attestation ``res`` of agent ``row`` from scratch (no kept state; tests, tools)."""
    return check_with(row, res, EvalStates(ima_check_for))[0]


#: json.dumps(obj, sort_keys=True) without building an encoder per call (dumps builds one
#: whenever it is given an option): the same encoder, so the same text
_dumps_sorted = json.JSONEncoder(sort_keys=True).encode


def check_with(row: dict[str, Any], res: dict[str, Any], states: EvalStates,
               ev: push_wire.Evidence | None = None) -> tuple[Outcome, Enrolment | None, Any]:
    """Verify attestation ``res`` of agent ``row`` with the agent's kept state (evalstate.py);
    ``ev``: the evidence as parsed when it was accepted (None: parsed from ``res``). Returns the
    outcome, and the enrolment and IMA hook used (for :meth:`EvalStates.passed`)."""
    try:
        if ev is None:
            doc = {"data": {"type": "attestation", "attributes": {"evidence_collected": res["evidence"]}}}
            ev = push_wire.parse_evidence(doc, res["evidence_requested"], res["hash_alg"])
        enr = states.enrolment(row)
    except (ProtocolError, ValueError) as exc:
        f = Failure(INVALID_QUOTE, {"message": "stored evidence is unusable", "error": str(exc)[:200]},
                    Severity.EMERGENCY)
        return Outcome([f], pstore.BROKEN_CHAIN, {}), None, None
    ak = enr.ak
    # decoded from the evidence's bytes (no base64 round trip); the text only when that fails,
    # so that a bad quote is reported exactly as the text path reports it
    parsed = push_wire.parsed_quote(ev)
    quote: str | ParsedQuote = parsed if parsed is not None else push_wire.quote_text(ev)
    hook = states.take_hook(row, enr)
    clock_text = row.get("tpm_clock_info")
    previous = states.previous_clock(row["agent_id"], clock_text) if clock_text else None
    ima = _requested(res, push_wire.IMA_LOG)
    ima_text, _ = ev.logs.get(push_wire.IMA_LOG, (None, 0))
    uefi, _ = ev.logs.get(push_wire.UEFI_LOG, (b"", 0))
    if isinstance(hook, AgentIma):
        # a new TPM boot (resetCount) starts the IMA progress again at line 0
        hook.for_boot(None, parsed.info.clock.reset_count if parsed is not None else _reset_count(ev.message))
    wanted = _requested(res, push_wire.TPM_QUOTE) or {}
    expect = evidence.Expectations(
        ak=ak, nonce=res["challenge"], nonce_base64=True, tpm_policy=enr.tpm_policy,
        accepted_hash_algs=enr.hash_algs, accepted_sign_algs=enr.sign_algs,
        # every PCR asked for must be quoted (else PCR 10 could be left out and IMA go unchecked)
        required_pcrs=tuple((wanted.get("selected_subjects") or {}).get(res["hash_alg"], [])),
        previous_clock=previous, nk_pem=None, ima=hook,
        # every push cycle sends the whole UEFI log: evaluated every time
        measured_boot=enr.mb, evaluate_boot_policy=True,
    )
    verdict = evidence.verify(expect, evidence.Evidence(
        quote=quote, hash_alg=res["hash_alg"], ima_list=ima_text if isinstance(ima_text, str) else None,
        ima_entry=int(ima["starting_offset"]) if ima is not None else 0,
        mb_log=uefi if isinstance(uefi, bytes) else b""))
    fails = list(verdict.failures)
    chain = verdict.check is None or bool(verdict.check.failures)
    if fails:
        reason = pstore.BROKEN_CHAIN if chain or any(f.event_id in _CHAIN_EVENTS for f in fails) \
            else pstore.POLICY_VIOLATION
        return Outcome(fails, reason, {}), enr, None
    assert verdict.check is not None
    values: dict[str, Any] = {
        "hash_alg": res["hash_alg"], "enc_alg": ak.enc_alg, "sign_alg": ak.sign_alg,
        "tpm_clock_info": states.clock_text(row["agent_id"], verdict.check.clock) if verdict.check.clock else None,
    }
    boot = boot_epoch((res.get("system_info") or {}).get("boot_time"))
    if boot is not None:
        values["boottime"] = boot
    if isinstance(hook, AgentIma) and verdict.next_entry is not None:
        values["next_ima_ml_entry"] = verdict.next_entry
        values["ima_progress"] = hook.progress_json()
        values["ima_pcr10"] = _dumps_sorted(dict(hook.progress.pcrs))
    return Outcome([], None, values), enr, hook


#: IMA text up to this size (≈ 50 ima-ng lines) is checked in the event loop (see Verifier._run)
INLINE_IMA_BYTES = 8192


def _small(ev: push_wire.Evidence) -> bool:
    ima_text, _ = ev.logs.get(push_wire.IMA_LOG, ("", 0))
    return push_wire.UEFI_LOG not in ev.logs and len(ima_text) <= INLINE_IMA_BYTES


class Settled:
    """A steady-state cycle checked inside its evidence transaction (:meth:`Verifier.settle`):
    the outcome, and for a pass the attestation's completed columns (``completed``: stored with
    the evidence, attestations.py), the rest of the pass to write (:meth:`write`) and what
    :meth:`EvalStates.passed` needs once it is committed; for a failure the state the failure
    path puts the agent in (nothing of the failure is written yet)."""

    __slots__ = ("_write", "completed", "done", "enr", "hook", "outcome", "state", "values")

    def __init__(self, outcome: Outcome, state: int, enr: Enrolment | None = None, hook: Any = None,
                 values: dict[str, Any] | None = None, completed: dict[str, Any] | None = None,
                 write: Callable[[Connection], bool] | None = None) -> None:
        self.outcome = outcome
        self.state = state
        self.enr = enr
        self.hook = hook
        self.values = values or {}
        #: a pass: the attestation's columns once complete (pstore.completed)
        self.completed = completed
        self._write = write
        #: the pass was written to the agent's row (it was active)
        self.done = False

    @property
    def passed(self) -> bool:
        return not self.outcome.failures

    def write(self, conn: Connection) -> None:
        """(A pass, in the evidence transaction, once its evidence is stored completed.) The
        agent's row and tokens, as :meth:`Verifier._run` writes them with the attestation's."""
        assert self._write is not None
        self.done = self._write(conn)


def _policy_ref(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """The agent's runtime policy reference as policy_ready/policy_loaded take it."""
    return row.get("runtime_policy_name") or None, row.get("runtime_policy_checksum") or None


def _written(outcome: Outcome) -> dict[str, Any]:
    """What a pass writes to the agent's row: the outcome's values that are set."""
    return {k: v for k, v in outcome.values.items() if v is not None}


def _error_outcome() -> Outcome:
    f = Failure("internal.verifier.exception", {"message": "verification error"}, Severity.CRITICAL)
    return Outcome([f], pstore.BROKEN_CHAIN, {})


class Verifier:
    """Runs verifications and timeouts for one verifier's push agents."""

    def __init__(
        self,
        store: Store,
        *,
        notifier: Outbox | Any,
        ima_check_for: ImaCheckFactory | None,
        clock: Callable[[], float],
        session_lifetime: float,
        max_interval: float,
        limiter: trio.CapacityLimiter | None = None,
        policy_ready: Callable[[str | None, str | None], Awaitable[None]] | None = None,
        policy_loaded: Callable[[str | None, str | None], bool] | None = None,
    ) -> None:
        self.store = store
        #: loads a runtime policy another process accepted (cluster, workers): without it the
        #: instance that takes the evidence would fail the agent as ``ima.policy_missing``
        self.policy_ready = policy_ready
        #: whether ``policy_ready`` has nothing to load (sync): :meth:`settle` checks in the
        #: evidence transaction only then (without it, never for an agent with a runtime policy)
        self.policy_loaded = policy_loaded
        self.notifier = notifier
        self.ima_check_for = ima_check_for
        self.clock = clock
        self.session_lifetime = session_lifetime
        self.max_interval = max_interval
        self.limiter = limiter or trio.CapacityLimiter(4)
        self.states = EvalStates(ima_check_for)
        #: callbacks on a final failure (the service disarms the agent's deadline)
        self.on_failed: Callable[[str], None] = lambda agent_id: None

    async def run(self, agent_id: str, index: int, accepted: Accepted | None = None) -> None:
        """Verify attestation ``index``; ``accepted``: the row, attestation and parsed evidence of
        the request that stored it (None after a restart: read back from the database)."""
        try:
            await self._run(agent_id, index, accepted)
        except Exception:  # fail closed: the attestation fails, the verifier carries on
            log.exception("agent=%s event=push_verification_error index=%d", agent_id, index)
            self.states.forget(agent_id)
            await self._fail(agent_id, index, _error_outcome(), records.FAILED)

    def settle(self, conn: Connection, row: dict[str, Any], res: dict[str, Any], ev: push_wire.Evidence,
               now: float) -> Settled | None:
        """(In the evidence transaction, in the store's thread, before the evidence is stored;
        ``res`` is the attestation as it will be once stored.) A steady-state cycle (what
        :func:`_small` accepts) is checked here; for a pass, attestations.py stores the evidence
        with the attestation completed (``Settled.completed``) in one statement and then
        :meth:`Settled.write` writes the agent's row and tokens, in this same transaction, as
        :meth:`_run` writes a pass; the 202 then follows a finished check. A failure is returned
        unwritten: the evidence is stored as evaluating and after the commit it takes the failure
        path of every failure (:meth:`run` with it in ``accepted.settled``: the agent, the
        attestation and the notice in one transaction of their own). None: nothing checked (large
        evidence, or a runtime policy this process has not loaded: loading it needs an await):
        :meth:`run` verifies after the 202, as before.

        The store may run this more than once (its group rolled back, a failed commit), and the
        evidence may turn out to be stored already (evidence_immutable: nothing is written): the
        IMA hook taken by a check that is not committed is dropped and the next check rebuilds one
        from the row it reads, and :meth:`EvalStates.passed` runs only after the commit
        (:meth:`committed`)."""
        if not _small(ev):
            return None
        if self.policy_ready is not None and has_runtime_policy(row) and (
                self.policy_loaded is None or not self.policy_loaded(*_policy_ref(row))):
            return None
        agent_id, index = row["agent_id"], res["index"]
        try:
            outcome, enr, hook = check_with(row, res, self.states, ev)
        except Exception:  # fail closed, as run() does
            log.exception("agent=%s event=push_verification_error index=%d", agent_id, index)
            return Settled(_error_outcome(), records.FAILED)
        if outcome.failures:
            return Settled(outcome, records.INVALID_QUOTE)
        values = _written(outcome)
        return Settled(outcome, records.GET_QUOTE, enr, hook, values, pstore.completed(pstore.PASS, now),
                       partial(self._write_agent_pass, agent_id=agent_id, now=now, values=values))

    def committed(self, row: dict[str, Any], index: int, settled: Settled) -> None:
        """A pass written by :meth:`settle` is committed: keep the agent's state for its next check."""
        if settled.done and settled.enr is not None:
            self.states.passed(row, settled.enr, settled.hook, settled.values)
        log.info("agent=%s event=push_attestation_pass index=%d", row["agent_id"], index)

    def _write_pass(self, conn: Connection, agent_id: str, index: int, now: float, values: dict[str, Any]) -> bool:
        pstore.complete(conn, agent_id, index, evaluation=pstore.PASS, now=now)
        return self._write_agent_pass(conn, agent_id=agent_id, now=now, values=values)

    def _write_agent_pass(self, conn: Connection, *, agent_id: str, now: float, values: dict[str, Any]) -> bool:
        """A pass's writes besides the attestation's: the agent's row (False: it is no longer
        active) and its tokens extended."""
        done = pstore.record_pass(conn, agent_id, now, values, _ACTIVE, records.GET_QUOTE)
        pstore.extend_tokens(conn, agent_id, now, now + self.session_lifetime)
        return done

    async def _run(self, agent_id: str, index: int, accepted: Accepted | None) -> None:
        if accepted is not None and accepted.settled is not None:
            # checked in the evidence transaction and failed there: the failure path, as below
            settled: Settled = accepted.settled
            assert not settled.passed
            self.states.forget(agent_id)
            await self._fail(agent_id, index, settled.outcome, settled.state)
            return
        if accepted is not None:
            row, res, ev = accepted.row, accepted.res, accepted.evidence
        else:
            row = await records.get(self.store, agent_id)
            res = await pstore.get_attestation(self.store, agent_id, index)
            ev = None
        if row is None or res is None or res["stage"] != pstore.EVALUATING:
            return
        if self.policy_ready is not None and has_runtime_policy(row):
            await self.policy_ready(*_policy_ref(row))
        async with self.limiter:  # bounds the verifications running at once, in either place
            if ev is not None and _small(ev):
                # a steady-state cycle (a quote and a few new IMA lines) costs less than the hop to
                # a worker thread and back; the pull monitor checks its polls in the event loop too
                outcome, enr, hook = check_with(row, res, self.states, ev)
            else:  # a first attestation (the whole IMA list), a UEFI log, a re-read after a restart
                outcome, enr, hook = await trio.to_thread.run_sync(partial(check_with, row, res, self.states, ev))
        if outcome.failures:
            self.states.forget(agent_id)
            await self._fail(agent_id, index, outcome, records.INVALID_QUOTE)
            return
        now = self.clock()
        values = _written(outcome)

        def txn(conn: Connection) -> bool:
            return self._write_pass(conn, agent_id, index, now, values)

        # group-committed with other agents' verdicts: one thread hop and one commit per group
        if await self.store.write_grouped(txn) and enr is not None:
            self.states.passed(row, enr, hook, values)
        log.info("agent=%s event=push_attestation_pass index=%d", agent_id, index)

    async def _fail(self, agent_id: str, index: int, outcome: Outcome, state: int) -> None:
        now = self.clock()
        bad = worst(outcome.failures)
        assert bad is not None
        row = await records.get(self.store, agent_id)

        def finish(conn: Connection) -> None:
            pstore.complete(conn, agent_id, index, evaluation=pstore.FAIL, now=now,
                            failure_reason=outcome.reason, failure_event=bad.event_id)

        log.warning("agent=%s event=push_attestation_fail index=%d reason=%s failures=%s", agent_id, index,
                    outcome.reason, ",".join(f.event_id for f in outcome.failures))
        if row is not None and await self._record(row, bad, state, now, also=finish):
            return
        await self.store.write(finish)  # stopped/deleted meanwhile: the attestation still completes

    async def timed_out(self, agent_id: str) -> None:
        row = await records.get(self.store, agent_id)
        if row is None or row["ip"] is not None:
            return
        f = Failure(TIMEOUT, {"message": f"no attestation within {self.max_interval:g} s"}, Severity.CRITICAL)
        if await self._record(row, f, records.FAILED, self.clock()):
            log.warning("agent=%s event=%s", agent_id, TIMEOUT)

    async def _record(self, row: dict[str, Any], failure: Failure, state: int, now: float,
                      also: Callable[[Connection], None] | None = None) -> bool:
        """The failure, its notice (outbox) and ``also`` in one transaction, if the agent is active."""
        notice = build_notice(row, failure)
        stage = getattr(self.notifier, "stage", None)

        def more(conn: Connection) -> None:
            if also is not None:
                also(conn)
            if stage is not None:
                stage(conn, notice, now)

        written = await records.record_failure(
            self.store, row["agent_id"], state=state, event_id=failure.event_id,
            severity_level=int(failure.severity), received_at=now if state == records.INVALID_QUOTE else None,
            only_in_states=ACTIVE_STATES, also=more)
        if not written:
            return False
        self.on_failed(row["agent_id"])
        if stage is not None:
            self.notifier.committed(notice)
        else:
            await self.notifier.publish(notice)
        return True
