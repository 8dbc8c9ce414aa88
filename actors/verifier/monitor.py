"""The verifier's attestation monitors: one task per enrolled agent, each in its own cancel scope.

:class:`MonitorSet` (owned by the Verifier actor, living in its nursery) starts and stops them;
the REST hooks call it after the store committed (enrol -> start, stop/delete -> stop at once,
reactivate -> reset progress + start).

One monitor (PROTOCOL.md "Polling"):

    loop: attest.attest_once (partial=0 until the NK is known, then partial=1)
          -> good: records.record_success; first good quote with V not yet delivered:
                   PROVIDE_V (5) -> POST keys/vkey -> GET_QUOTE (3); then sleep quote_interval
          -> failures: record the worst, INVALID_QUOTE (9), notice, end
          -> CommunicationError / HTTP 408/500/599: GET_QUOTE_RETRY (4) (PROVIDE_V_RETRY (6) while
             delivering V), sleep retry_delay(n), after max_retries: FAILED (7) + notice, end;
             a good answer in a retry state returns to GET_QUOTE
          -> any other HTTP status or a malformed/oversized reply: FAILED (7) at once + notice

Event ids of verifier-side failures (the quote checks name their own, protocol/quote_check.py):

* ``internal.verifier.not_reachable`` - the agent stayed unreachable through max_retries (context:
  kind, attempts);
* ``internal.verifier.no_quote`` - a non-retryable HTTP status (context: status);
* ``internal.verifier.exception`` - not an envelope / not JSON / over max_response_size, or an
  unexpected exception inside a monitor (a verifier bug or a
  corrupt record). Fail closed: the agent goes FAILED and the notice goes out, the other
  monitors carry on.

V delivery is at-least-once: ``v_delivered`` is set in the same write that returns the agent to
GET_QUOTE after the agent acknowledged V; a verifier stopping between the two re-sends V after a
restart, which the agent treats as the same half again (K = U xor V is unchanged). A reactivate
clears ``v_delivered`` (a restarted agent lost its K; upstream also re-provides V then).

IMA: with a runtime policy the hook is an :class:`actors.verifier.ima.AgentIma`; its progress
(running PCR 10, line count, boot identity, learned keys) is written in the same transaction as
the poll's success record (``ima_progress``) and restored from it on (re)start.

Resuming: the TPM clock info, the next IMA entry, boottime and the algorithms come from the
stored row, so a verifier restart continues the clock checks and the IMA tail (partial=0 once,
for the NK, but with ``ima_ml_entry`` = the stored progress: no full re-read of the IMA log).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from keytrio.actors.common.client import (
    CommunicationError,
    HttpError,
    KeepAliveClient,
    MalformedResponse,
    is_retryable,
    retry_delay,
)
from keytrio.actors.common.store import Dropped, GroupedWrite, Store
from keytrio.actors.verifier import attest, records
from keytrio.actors.verifier.attest import AgentTarget, AttestState
from keytrio.actors.verifier.metrics import VerifierMetrics
from keytrio.actors.verifier.notify import Notifier, build_notice
from keytrio.actors.verifier.poll_timer import PollTimer
from keytrio.protocol import tpm2
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.evidence import ImaHook
from keytrio.protocol.failures import Failure, Severity, worst
from keytrio.protocol.quote import ClockInfo

log = logging.getLogger("keytrio.verifier")

#: states in which an agent is polled (a monitor only writes while its agent is in one of them)
ACTIVE_STATES = frozenset(
    {records.START, records.GET_QUOTE, records.GET_QUOTE_RETRY, records.PROVIDE_V, records.PROVIDE_V_RETRY}
)

# upstream's ids for the same failures (Failure(Component.INTERNAL, ["verifier"]) in its verifier)
COMM_ERROR = "internal.verifier.not_reachable"
COMM_HTTP_STATUS = "internal.verifier.no_quote"
COMM_MALFORMED = "internal.verifier.exception"
INTERNAL_ERROR = "internal.verifier.exception"


@dataclass(frozen=True)
class MonitorSettings:
    quote_interval: float = 2.0
    retry_interval: float = 2.0
    max_retries: int = 10
    exponential_backoff: bool = True
    request_timeout: float = 60.0
    max_response_size: int = 64 << 20
    keepalive_expiry: float = 4.0
    measured_boot_evaluate: str = "once"  # once (per boot) | always
    # how long a success record may wait for others to share its commit (Store.group_linger);
    # the next poll is due quote_interval after the verdict, so the wait does not lengthen the cycle
    write_linger: float = 0.0


#: agent row -> client SSL context (CA + pinned mtls_cert + our client cert)
ContextFactory = Callable[[dict[str, Any]], ssl.SSLContext]
#: agent row -> the IMA hook for it (None: no runtime policy, PCR 10 not checked)
ImaCheckFactory = Callable[[dict[str, Any]], ImaHook | None]


class RequestSlots:
    """At most ``n`` requests to agents at once: a counter, and a parking lot only while every
    slot is taken (a CapacityLimiter's borrower bookkeeping and checkpoints cost more per poll).
    A release while someone waits hands its slot straight to the first waiter."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._lot = trio.lowlevel.ParkingLot()

    def take_free(self) -> bool:
        """Take a free slot at once (no checkpoint, no coroutine); False when none is free."""
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot; no checkpoint when one is free (the caller's request has its own)."""
        if not self.take_free():
            await self._lot.park()  # woken by release() with its slot

    def release(self) -> None:
        if self._lot:
            self._lot.unpark()
        else:
            self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def _cancelled() -> bool:
    """``trio.current_effective_deadline() == -math.inf`` (this task is cancelled: by its own
    scope, e.g. a tenant stop, or an enclosing one, e.g. shutdown) without its walk up every
    enclosing scope (≈ 3 µs a poll at a monitor's depth): the task's cancel status already knows.
    A deadline set to -inf and not processed yet is the one case only the walk sees; nothing
    here sets one (trio cancels a scope whose deadline passed at its next scheduling pass, and
    this answers False for it either way). trio versions without the attribute take the walk."""
    status = getattr(trio.lowlevel.current_task(), "_cancel_status", None)
    if status is None:
        return trio.current_effective_deadline() == -math.inf
    return status.effectively_cancelled is True


class _Ended(Exception):
    """The monitor's agent reached a final state (or vanished); stop quietly."""


def target_from_row(
    row: dict[str, Any], ima_check: ImaHook | None = None, *, mb_evaluate: str = "once"
) -> AgentTarget:
    """Parse a stored enrolment once (ValueError/ProtocolError on a corrupt row)."""
    return AgentTarget(
        agent_id=row["agent_id"],
        ip=row["ip"],
        port=int(row["port"]),
        mtls_cert=row["mtls_cert"] or "",
        ak=tpm2.ak_key(base64.b64decode(row["ak_tpm"], validate=True)),
        tpm_policy=json.loads(row["tpm_policy"]),
        accept_tpm_hash_algs=json.loads(row["accept_tpm_hash_algs"]),
        accept_tpm_signing_algs=json.loads(row["accept_tpm_signing_algs"]),
        accept_tpm_encryption_algs=json.loads(row["accept_tpm_encryption_algs"]),
        supported_version=row["supported_version"],
        ima_check=ima_check,
        mb_policy=row.get("mb_policy") or None,
        mb_evaluate=mb_evaluate,
    )


def state_from_row(row: dict[str, Any]) -> AttestState:
    """The progress a previous monitor (maybe of a previous verifier process) left behind."""
    clock: ClockInfo | None = None
    if row.get("tpm_clock_info"):
        try:
            clock = ClockInfo.from_json(json.loads(row["tpm_clock_info"]))
        except (ValueError, ProtocolError):
            log.warning("agent=%s event=bad_stored_clock_info ignored", row["agent_id"])
    return AttestState(
        clock=clock,
        ima_ml_entry=int(row.get("next_ima_ml_entry") or 0),
        boottime=row.get("boottime"),
        hash_alg=row.get("hash_alg") or None,
        enc_alg=row.get("enc_alg") or None,
        sign_alg=row.get("sign_alg") or None,
        attestation_count=int(row.get("attestation_count") or 0),
    )


class MonitorSet:
    """The monitors of one verifier: ``start(agent_id)``, ``stop(agent_id)``, ``running``."""

    def __init__(
        self,
        store: Store,
        *,
        nursery: trio.Nursery,
        settings: MonitorSettings,
        context_for: ContextFactory,
        notifier: Notifier,
        max_concurrent_requests: int = 64,
        clock: Callable[[], float] = time.time,
        ima_check_for: ImaCheckFactory | None = None,
        metrics: VerifierMetrics | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics or VerifierMetrics()
        self._nursery = nursery
        self._context_for = context_for
        self._notifier = notifier
        self._limiter = RequestSlots(max_concurrent_requests)
        self._clock = clock
        self._ima_check_for = ima_check_for
        self._scopes: dict[str, trio.CancelScope] = {}
        # agent -> its monitor's success record handed to the group committer, not yet collected
        self._queued: dict[str, GroupedWrite] = {}
        if settings.write_linger > 0:
            store.group_linger = settings.write_linger
        # polls due within 2.5 % of an interval of each other share one timer wake-up
        self.timer = PollTimer(nursery, slack=min(0.05, settings.quote_interval / 40))

    @property
    def running(self) -> set[str]:
        return set(self._scopes)

    def start(self, agent_id: str) -> None:
        """(Re)start the monitor of ``agent_id``; an existing one is cancelled first."""
        self.stop(agent_id)
        scope = trio.CancelScope()
        self._scopes[agent_id] = scope
        self._nursery.start_soon(self._guarded, agent_id, scope)

    def stop(self, agent_id: str) -> None:
        """Cancel the monitor at once: it sends no further request to the agent."""
        scope = self._scopes.pop(agent_id, None)
        if scope is not None:
            scope.cancel()
        # a record queued by the monitor and not started yet is taken back now, not when the
        # cancelled task next runs: a group started meanwhile would land it after what the caller
        # writes next (reactivate's reset, a new monitor's records)
        queued = self._queued.pop(agent_id, None)
        if queued is not None:
            self.store.drop(queued)

    def stop_all(self) -> None:
        for aid in list(self._scopes):
            self.stop(aid)

    async def reactivate(self, agent_id: str) -> None:
        """PUT reactivate: fresh start (NK, IMA from entry 0, clock, V re-delivered), then start."""
        self.stop(agent_id)
        # the REST route already reset the row (records.reactivate, one transaction); again here
        # in case the cancelled monitor wrote its old progress in between
        await records.update(self.store, agent_id, **records.RESET_PROGRESS)
        self.start(agent_id)

    async def _guarded(self, agent_id: str, scope: trio.CancelScope) -> None:
        try:
            with scope:
                try:
                    await Monitor(self, agent_id).run()
                except _Ended:
                    pass
                except Exception as exc:  # nothing one agent causes may reach the nursery
                    log.exception("agent=%s event=%s", agent_id, INTERNAL_ERROR)
                    await self._internal_failure(agent_id, exc)
        finally:
            if self._scopes.get(agent_id) is scope:
                del self._scopes[agent_id]

    async def _internal_failure(self, agent_id: str, exc: Exception) -> None:
        failure = Failure(INTERNAL_ERROR, {"message": "monitor error", "error": type(exc).__name__},
                          Severity.CRITICAL)
        try:
            await fail(self, agent_id, records.FAILED, failure)
        except Exception:  # the store itself is broken: logged, the verifier carries on
            log.exception("agent=%s event=record_failure_failed", agent_id)

    # used by Monitor
    @property
    def nursery(self) -> trio.Nursery:
        return self._nursery

    @property
    def limiter(self) -> RequestSlots:
        return self._limiter

    def context_for(self, row: dict[str, Any]) -> ssl.SSLContext:
        return self._context_for(row)

    def ima_check_for(self, row: dict[str, Any]) -> ImaHook | None:
        return self._ima_check_for(row) if self._ima_check_for is not None else None

    def now(self) -> float:
        return self._clock()

    @property
    def notifier(self) -> Notifier:
        return self._notifier


async def fail(ms: MonitorSet, agent_id: str, state: int, failure: Failure, *, received: bool = False) -> None:
    """Record ``failure`` (state + worst event) and its notice, unless a tenant action won.

    The failure and the notice (with its deliveries, ``Notifier.stage``) are committed in ONE
    transaction before any delivery is attempted.
    """
    now = ms.now()
    row = await records.get(ms.store, agent_id)
    if row is None or row["operational_state"] not in ACTIVE_STATES:
        return  # stopped or deleted meanwhile: the tenant's action stands, no notice
    notice = build_notice(row, failure)
    notifier = ms.notifier
    written = await records.record_failure(
        ms.store,
        agent_id,
        state=state,
        event_id=failure.event_id,
        severity_level=int(failure.severity),
        received_at=now if received else None,
        only_in_states=ACTIVE_STATES,
        also=lambda conn: notifier.stage(conn, notice, now),
    )
    if not written:  # stopped or deleted meanwhile: the tenant's action stands, no notice
        return
    ms.metrics.failures.labels(failure.event_id).inc()
    log.warning("agent=%s event=%s state=%d severity=%s notice=%s", agent_id, failure.event_id, state,
                failure.severity.label, notice.notice_id)
    notifier.committed(notice)


class Monitor:
    """The polling loop of one agent (runs inside its MonitorSet's cancel scope)."""

    def __init__(self, ms: MonitorSet, agent_id: str) -> None:
        self.ms = ms
        self.agent_id = agent_id
        self.s = ms.settings
        self.db_state: int | None = None  # last operational_state this monitor wrote/read
        self.queued: GroupedWrite | None = None  # last success record, handed over, not collected
        #: trio.current_time without its two calls (it is the run's clock's current_time; set in run)
        self._time: Callable[[], float] = trio.current_time

    async def run(self) -> None:
        row = await records.get(self.ms.store, self.agent_id)
        if row is None or row["operational_state"] not in ACTIVE_STATES:
            return
        self.db_state = row["operational_state"]
        target = target_from_row(
            row, self.ms.ima_check_for(row), mb_evaluate=self.ms.settings.measured_boot_evaluate
        )
        state = state_from_row(row)
        ima_hook = target.ima_check
        if ima_hook is not None:
            state.ima_ml_entry = ima_hook.progress.count  # the restored progress decides the tail
        v_delivered = bool(row["v_delivered"])
        v = base64.b64decode(row["v"]) if row["v"] else None
        # one keep-alive connection per agent (requests to it go one at a time), reused across
        # polls while idle < keepalive_expiry (the verifier sets quote_interval + 10 s: no handshake
        # per poll unless the agent closed the connection meanwhile)
        client = KeepAliveClient(self.ms.context_for(row), timeout=self.s.request_timeout,
                                 keepalive_expiry=self.s.keepalive_expiry)
        log.info("agent=%s event=monitor_started state=%d count=%d", self.agent_id, self.db_state,
                 state.attestation_count)
        written_algs: tuple[Any, ...] | None = None  # nothing written by this monitor yet
        # trio.current_time() is the run's clock's current_time(), and a run keeps its clock
        self._time = now_t = trio.lowlevel.current_clock().current_time
        written_progress: Any = None
        try:
            while True:
                if self.queued is not None:
                    await self._collect()
                # the poll's first attempt, awaited here (a steady poll builds no closure and
                # enters no _with_retries frame); an exception is handed to the retry loop as that
                # attempt's outcome, so its clauses alone decide (retry, back off, fail, or let it
                # propagate); Cancelled is no Exception and propagates from here at once
                first: Exception | None = None
                try:
                    failures = await self._attempt(client, target, state)
                except Exception as exc:
                    first = exc
                if first is not None:
                    failures = await self._with_retries(
                        functools.partial(self._attempt, client, target, state), records.GET_QUOTE_RETRY, first)
                now = self.ms.now()
                due = now_t() + self.s.quote_interval
                if failures:
                    bad = worst(failures)
                    assert bad is not None
                    log.warning("agent=%s event=quote_failed failures=%s", self.agent_id,
                                ",".join(f.event_id for f in failures))
                    await self._fail(records.INVALID_QUOTE, bad, received=True)
                    return
                need_v = not v_delivered and v is not None
                next_state = records.PROVIDE_V if need_v else records.GET_QUOTE
                # columns equal to what this monitor last committed are left out (None = keep):
                # on a poll without new IMA lines only the clock, entry, count and times change
                algs = (state.hash_alg, state.enc_alg, state.sign_alg, state.boottime)
                progress = ima_hook.progress if ima_hook is not None else None
                new_algs = algs != written_algs
                new_progress = progress is not None and progress is not written_progress \
                    and progress != written_progress
                if _cancelled():
                    # stopped while this step ran (stop() found nothing of ours to take back):
                    # hand nothing over, end at this checkpoint
                    await trio.lowlevel.checkpoint()
                record = records.submit_success(
                    self.ms.store,
                    self.agent_id,
                    nursery=self.ms.nursery,
                    now=now,
                    hash_alg=state.hash_alg if new_algs else None,
                    enc_alg=state.enc_alg if new_algs else None,
                    sign_alg=state.sign_alg if new_algs else None,
                    next_ima_ml_entry=state.ima_ml_entry,
                    ima_pcr10=dict(progress.pcrs) if progress is not None and new_progress else None,
                    ima_progress=ima_hook.progress_json() if ima_hook is not None and new_progress else None,
                    boottime=state.boottime if new_algs else None,
                    clock_info=state.clock,
                    state=next_state if next_state != self.db_state else None,
                    only_in_states=ACTIVE_STATES,
                )
                if need_v or next_state != self.db_state:
                    # what follows (V delivery, a state change) needs the record committed first
                    await self._write(self.ms.store.collect(record))
                else:
                    # steady state: the committer task commits it while we sleep; its outcome is
                    # collected before this monitor's next write or poll (_collect), so a record
                    # that was refused or failed still ends the monitor before it polls again
                    self._hand_over(record)
                written_algs, written_progress = algs, progress
                self.db_state = next_state
                if need_v:
                    assert v is not None and state.nk_pem is not None
                    await self._deliver_v(client, target, v, state.nk_pem)
                    v_delivered = True
                    due = now_t() + self.s.quote_interval
                await self.ms.timer.sleep_until(due)
        finally:
            if self.queued is not None:
                # as a cancelled write_grouped: a record not started is dropped, a started one
                # completes before this monitor ends (and before _guarded may record a failure)
                record, self.queued = self.queued, None
                self._forget(record)
                if not self.ms.store.drop(record) and not record.done:
                    with trio.CancelScope(shield=True):
                        try:
                            await self.ms.store.collect(record)
                        except Exception:  # the monitor ends anyway: what it raised is logged
                            log.warning("agent=%s event=queued_record_failed", self.agent_id, exc_info=True)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await client.aclose()

    def _hand_over(self, record: GroupedWrite) -> None:
        # in _queued too: MonitorSet.stop() takes it back at once
        self.queued = self.ms._queued[self.agent_id] = record

    def _forget(self, record: GroupedWrite) -> None:
        if self.ms._queued.get(self.agent_id) is record:
            del self.ms._queued[self.agent_id]

    async def _collect(self) -> None:
        """The outcome of the success record handed over last poll (no checkpoint once its group
        committed, the steady state): not written (stopped, deleted, reactivated or fenced
        meanwhile) ends the monitor, an error is raised here as it was by the write itself."""
        record, self.queued = self.queued, None
        assert record is not None
        try:
            # left in _queued while waiting: a stop() meanwhile still takes it back at once
            written = await self.ms.store.collect(record)  # no checkpoint once its group ran
        except Dropped:  # taken back by stop(): this monitor is cancelled
            await trio.lowlevel.checkpoint()  # raises Cancelled
            raise _Ended from None
        finally:
            self._forget(record)
        if not written:
            raise _Ended  # deleted, stopped or reactivated meanwhile: this monitor is stale

    async def _write(self, pending: Any) -> None:
        """Await ``pending`` (a coroutine of this agent's write, not started yet); not written:
        the monitor ends. A success record still queued is collected first: a later write of
        this agent never overtakes it."""
        if self.queued is not None:
            try:
                await self._collect()
            except BaseException:
                pending.close()
                raise
        if not await pending:
            raise _Ended  # deleted, stopped or reactivated meanwhile: this monitor is stale

    async def _set_state(self, new: int, **values: Any) -> None:
        if new == self.db_state and not values:
            return
        await self._write(records.update_if_state(
            self.ms.store, self.agent_id, ACTIVE_STATES, operational_state=new, **values))
        self.db_state = new

    async def _attempt(self, client: KeepAliveClient, target: AgentTarget, state: AttestState) -> list[Failure]:
        """One request for a quote and its verdict, counted in the poll metrics."""
        m = self.ms.metrics
        slots = self.ms.limiter
        # a free slot is taken without a checkpoint (the request that follows has plenty) and
        # without a coroutine; a full set parks in acquire
        if not slots.take_free():
            await slots.acquire()
        now = self._time
        start, entry = now(), state.ima_ml_entry
        result: str | None = "error"
        try:
            failures = await attest.attest_once(
                client, target, state, max_response_bytes=self.s.max_response_size)
            result = "failed" if failures else "ok"
            # lines evaluated this poll; a smaller entry means the log restarted (reboot).
            # Most polls have none: adding 0 would still take the counter's lock
            lines = state.ima_ml_entry - entry if state.ima_ml_entry >= entry else state.ima_ml_entry
            if lines > 0:
                m.ima_lines.inc(lines)
            return failures
        except (CommunicationError, HttpError):
            result = "comm_error"
            raise
        except MalformedResponse:
            result = "malformed"
            raise
        except trio.Cancelled:
            result = None  # shutdown or tenant stop: not a poll outcome
            raise
        finally:
            slots.release()
            if result is not None:
                m.poll_results[result].inc()
                m.poll_seconds.observe(now() - start)

    async def _deliver_v(self, client: KeepAliveClient, target: AgentTarget, v: bytes, nk_pem: str) -> None:
        async def once() -> None:
            async with self.ms.limiter:
                await attest.deliver_v(client, target, v, nk_pem)

        await self._with_retries(once, records.PROVIDE_V_RETRY)
        await self._set_state(records.GET_QUOTE, v_delivered=True)
        log.info("agent=%s event=v_delivered", self.agent_id)

    async def _with_retries(self, fn: Callable[[], Any], retry_state: int,
                            first: Exception | None = None) -> Any:
        """``fn()`` until it returns, retrying what is retryable; ``first``: what the first
        attempt, already made by the caller, raised (handled as if ``fn()`` had raised it)."""
        attempt = 0
        while True:
            try:
                if first is not None:
                    exc, first = first, None
                    raise exc
                return await fn()
            except (CommunicationError, HttpError) as exc:
                if not is_retryable(exc):
                    await self._fail_now(COMM_HTTP_STATUS, exc, status=getattr(exc, "status_code", None))
                if attempt >= self.s.max_retries:
                    await self._fail_now(COMM_ERROR, exc, attempts=attempt + 1,
                                         kind=getattr(exc, "kind", None), status=getattr(exc, "status_code", None))
                attempt += 1
                delay = retry_delay(attempt, self.s.retry_interval, self.s.exponential_backoff)
                if not math.isfinite(delay):
                    delay = self.s.retry_interval
                log.info("agent=%s event=retry attempt=%d delay=%.3g error=%s", self.agent_id, attempt, delay, exc)
                await self._set_state(retry_state)
            except MalformedResponse as exc:
                await self._fail_now(COMM_MALFORMED, exc, status=exc.status_code)
            except (binascii.Error, ValueError, ProtocolError) as exc:
                # e.g. V or the NK that deliver_v encrypts to is unusable: fail closed
                await self._fail_now(COMM_MALFORMED, exc)
            await trio.sleep(delay)

    async def _fail(self, state: int, failure: Failure, *, received: bool = False) -> None:
        if self.queued is not None:  # the success queued before it lands first
            await self._collect()
        await fail(self.ms, self.agent_id, state, failure, received=received)

    async def _fail_now(self, event_id: str, exc: Exception, **context: Any) -> NoReturn:
        ctx = {"message": str(exc)[:500], **{k: v for k, v in context.items() if v is not None}}
        await self._fail(records.FAILED, Failure(event_id, ctx, Severity.CRITICAL))
        raise _Ended
