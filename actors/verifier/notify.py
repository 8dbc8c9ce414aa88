"""Revocation notices: build + sign one per failure, deliver it durably to every agent of this verifier.

* :func:`build_notice` makes a :class:`SignedNotice` from the failing agent's record and the
  failure (``protocol.revocation.build_message`` / ``sign_message``; an empty signature when the
  agent was enrolled without a ``revocation_key``, as upstream does). Each notice has its own
  ``notice_id`` (uuid4) so agents drop re-sent duplicates.
* :class:`Notifier` is the interface the monitor uses (``await publish(notice)``).
* :class:`Outbox` is the verifier's notifier: a notice is stored (``verifier_notices``) with one
  delivery row per recipient (``verifier_deliveries``: every agent of ``verifier_id`` at that
  moment, the failing one included, and the webhook) *before* any attempt. The monitor stages it
  in the very transaction that records the failure (:meth:`Outbox.stage`), so a crash either loses
  both or neither. One delivery loop (:meth:`Outbox.run`, in the actor's nursery) POSTs
  ``/v{supported_version}/notifications/revocation`` to each due recipient over its own pinned
  mTLS client (bounded concurrency); a 2xx marks the row delivered, anything else reschedules it
  with doubling backoff (``retry_interval`` .. ``max_retry_interval``) until the notice expires
  (``revocation_notice_ttl``). Rows are updated in the store after every attempt, so a restarted
  verifier resumes exactly the pending deliveries. Delivery is at-least-once (a crash between the
  agent's 2xx and our commit re-sends); agents dedupe by ``notice_id``, so actions run once.
  A recipient agent no longer enrolled at attempt time is ``abandoned``. Once a notice has
  expired and none of its deliveries is pending, the loop deletes it with its rows (every
  ``PRUNE_EVERY`` seconds, at most ``ttl``): both tables stay bounded by the failures of one TTL.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import sqlalchemy as sa
import trio
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.engine import Connection

from keytrio.actors.common import tls
from keytrio.actors.common.client import ClientError, HttpError, make_client, request_json
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.metrics import VerifierMetrics
from keytrio.actors.verifier.schema import agents, deliveries, notices
from keytrio.protocol import revocation
from keytrio.protocol.failures import Failure

log = logging.getLogger("keytrio.verifier")

NOTICE_TIMEOUT = 10.0  # seconds per attempt
NOTICE_CONCURRENCY = 16  # recipients contacted at once (per notifier)
NOTICE_TTL = 86400.0  # seconds a notice is retried (revocation_notice_ttl)
MAX_RETRY_INTERVAL = 60.0  # backoff cap between two attempts to one recipient
WEBHOOK = "webhook"  # the recipient name of the webhook delivery
BATCH = 500  # deliveries looked at per loop round, and the most attempts in flight at once
PRUNE_EVERY = 3600.0  # seconds between two sweeps of expired, finished notices (at most the TTL)
PRUNE_FIRST = 60.0  # seconds after start before the first sweep (at most the TTL)

PENDING, DELIVERED, EXPIRED, ABANDONED = "pending", "delivered", "expired", "abandoned"


@dataclass(frozen=True)
class SignedNotice:
    """The wire body ``{"msg", "signature"}`` plus what logs need."""

    agent_id: str  # the failing agent
    notice_id: str
    event_id: str
    msg: str
    signature: str

    def body(self) -> dict[str, str]:
        return revocation.Notice(self.msg, self.signature).encode()


def load_revocation_key(pem: str | None) -> rsa.RSAPrivateKey | None:
    """The enrolled ``revocation_key`` (PEM RSA private key text) or None when absent/unusable."""
    if not pem:
        return None
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, rsa.RSAPrivateKey) else None


def build_notice(
    row: dict[str, Any],
    failure: Failure,
    *,
    event_time: str | None = None,
    notice_id: str | None = None,
) -> SignedNotice:
    """A signed notice about ``failure`` of the agent whose record is ``row``."""
    notice_id = notice_id or str(uuid.uuid4())
    msg = revocation.build_message(
        agent_id=row["agent_id"],
        ip=row["ip"],
        port=row["port"],
        tpm_policy=row["tpm_policy"],
        meta_data=row["meta_data"],
        event_time=event_time or time.asctime(),
        event_id=failure.event_id,
        severity_label=failure.severity.label,
        context=failure.context,
        notice_id=notice_id,
    )
    key = load_revocation_key(row.get("revocation_key"))
    if key is None and row.get("revocation_key"):
        log.warning("agent=%s event=revocation_key_unusable the notice goes out unsigned", row["agent_id"])
    signature = revocation.sign_message(key, msg) if key is not None else ""
    return SignedNotice(row["agent_id"], notice_id, failure.event_id, msg, signature)


class Notifier(Protocol):
    """Where the monitor hands notices; an implementation owns delivery (and durability)."""

    def stage(self, conn: Connection, notice: SignedNotice, now: float) -> int:
        """Store the notice in the caller's transaction (the one recording the failure)."""

    def committed(self, notice: SignedNotice) -> None:
        """That transaction committed: deliver the notice."""

    async def publish(self, notice: SignedNotice) -> None: ...


#: agent row -> SSL context for talking to that agent (pinned mtls_cert + our client cert)
ContextFactory = Callable[[dict[str, Any]], ssl.SSLContext]


@dataclass(frozen=True)
class _Due:
    notice_id: str
    recipient: str
    attempts: int
    expires_at: float
    msg: str
    signature: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.notice_id, self.recipient)


class Outbox:
    """The durable notifier of one verifier (see the module docstring); ``run`` it in the nursery."""

    def __init__(
        self,
        store: Store,
        *,
        verifier_id: str,
        context_for: ContextFactory,
        webhook_url: str = "",
        webhook_ca_files: Iterable[str | Path] = (),
        retry_interval: float = 0.5,
        max_retry_interval: float = MAX_RETRY_INTERVAL,
        exponential: bool = True,
        timeout: float = NOTICE_TIMEOUT,
        ttl: float = NOTICE_TTL,
        concurrency: int = NOTICE_CONCURRENCY,
        clock: Callable[[], float] = time.time,
        metrics: VerifierMetrics | None = None,
        batch: int = BATCH,
    ) -> None:
        self._metrics = metrics
        self._batch = max(batch, 1)
        self._store = store
        self._verifier_id = verifier_id
        self._context_for = context_for
        self._webhook_url = webhook_url
        self._webhook_ca_files = tuple(webhook_ca_files)
        self._interval = max(retry_interval, 0.01)
        self._max_interval = max(max_retry_interval, self._interval)
        self._exponential = exponential
        self._timeout = timeout
        self._ttl = ttl
        self._limiter = trio.CapacityLimiter(concurrency)
        self._clock = clock
        self._wake = trio.Event()
        # the (notice, recipient) attempts running now: never more than ``batch`` (run() waits for
        # some to finish first), so neither this set nor the nursery grows with a backlog
        self._inflight: set[tuple[str, str]] = set()
        self._next_prune = 0.0  # when to look for finished notices past their TTL (clock seconds)

    # --- storing ------------------------------------------------------------------------------

    def stage(self, conn: Connection, notice: SignedNotice, now: float) -> int:
        """Store ``notice`` + its deliveries in the caller's transaction; returns the recipient count."""
        conn.execute(sa.insert(notices).values(
            notice_id=notice.notice_id, verifier_id=self._verifier_id, agent_id=notice.agent_id,
            event_id=notice.event_id, msg=notice.msg, signature=notice.signature,
            created_at=now, expires_at=now + self._ttl,
        ))
        recipients = list(conn.execute(
            # push agents (ip NULL) listen on no port: the webhook and their next GET tell them
            sa.select(agents.c.agent_id).where(agents.c.verifier_id == self._verifier_id,
                                               agents.c.ip.isnot(None))).scalars())
        if self._webhook_url:
            recipients.append(WEBHOOK)
        if recipients:
            conn.execute(sa.insert(deliveries), [
                {"notice_id": notice.notice_id, "recipient": r, "verifier_id": self._verifier_id,
                 "state": PENDING, "attempts": 0, "next_attempt_at": now} for r in recipients
            ])
        return len(recipients)

    def committed(self, notice: SignedNotice) -> None:
        """The transaction that staged ``notice`` committed: deliver it now."""
        log.info("agent=%s event=revocation_notice notice=%s event_id=%s",
                 notice.agent_id, notice.notice_id, notice.event_id)
        if self._metrics is not None:
            self._metrics.notices.inc()
        self.kick()

    async def publish(self, notice: SignedNotice) -> None:
        """Store ``notice`` (own transaction) and return once it is committed."""
        now = self._clock()
        await self._store.write(lambda conn: self.stage(conn, notice, now))
        self.committed(notice)

    def kick(self) -> None:
        self._wake.set()

    # --- status ------------------------------------------------------------------------------

    async def pending_counts(self, recipients: list[str] | None = None) -> dict[str, int]:
        """Pending deliveries of this verifier per recipient (all recipients, or only these)."""

        def q(conn: Connection) -> dict[str, int]:
            stmt = (sa.select(deliveries.c.recipient, sa.func.count())
                    .where(deliveries.c.state == PENDING, deliveries.c.verifier_id == self._verifier_id)
                    .group_by(deliveries.c.recipient))
            if recipients is not None:
                stmt = stmt.where(deliveries.c.recipient.in_(recipients))
            return {r: int(n) for r, n in conn.execute(stmt)}

        return await self._store.read(q)

    # --- the delivery loop ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver due rows until cancelled (resumes what a previous process left pending)."""
        pending = await self.pending_counts()
        if pending:
            log.info("event=outbox.resumed verifier_id=%s pending=%d recipients=%d",
                     self._verifier_id, sum(pending.values()), len(pending))
        task_status.started()
        # not at once: a (re)start has resumed monitors to serve first
        self._next_prune = self._clock() + min(self._ttl, PRUNE_FIRST)
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()  # before reading: a kick during the read is not lost
                try:
                    due, next_at = await self._store.read(self._due)
                except Exception:  # a database hiccup: try again shortly
                    log.exception("event=outbox.read_failed")
                    due, next_at = [], self._clock() + 1.0
                for d in due[:max(self._batch - len(self._inflight), 0)]:
                    self._inflight.add(d.key)
                    nursery.start_soon(self._attempt, d)
                if self._clock() >= self._next_prune:
                    await self._prune()
                delay = 5.0 if next_at is None else min(max(next_at - self._clock(), 0.0), 5.0)
                with trio.move_on_after(delay):
                    await self._wake.wait()

    async def _prune(self) -> None:
        """Delete this verifier's notices that expired with no delivery pending (and their rows).

        The outbox is a queue, not an archive (the log keeps every notice and outcome): without
        this the two tables would grow by one notice per failure and one row per agent for ever.
        """
        now = self._clock()
        self._next_prune = now + min(self._ttl, PRUNE_EVERY)

        def txn(conn: Connection) -> int:
            pending = (sa.select(deliveries.c.notice_id)
                       .where(deliveries.c.notice_id == notices.c.notice_id, deliveries.c.state == PENDING))
            ids = list(conn.execute(
                sa.select(notices.c.notice_id)
                .where(notices.c.verifier_id == self._verifier_id, notices.c.expires_at < now, ~pending.exists())
                .limit(self._batch)).scalars())
            if ids:
                conn.execute(sa.delete(deliveries).where(deliveries.c.notice_id.in_(ids)))
                conn.execute(sa.delete(notices).where(notices.c.notice_id.in_(ids)))
            return len(ids)

        try:
            gone = await self._store.write(txn)
        except Exception:  # a database hiccup: the rows stay, the next prune takes them
            log.exception("event=outbox.prune_failed")
            return
        if gone:
            log.info("event=outbox.pruned verifier_id=%s notices=%d", self._verifier_id, gone)
            if gone == self._batch:
                self._next_prune = now  # more of them: go on next round

    def _due(self, conn: Connection) -> tuple[list[_Due], float | None]:
        now = self._clock()
        rows = conn.execute(
            sa.select(deliveries.c.notice_id, deliveries.c.recipient, deliveries.c.attempts,
                      deliveries.c.next_attempt_at, notices.c.expires_at, notices.c.msg, notices.c.signature)
            .join(notices, notices.c.notice_id == deliveries.c.notice_id)
            .where(deliveries.c.verifier_id == self._verifier_id, deliveries.c.state == PENDING)
            .order_by(deliveries.c.next_attempt_at).limit(self._batch)
        ).all()
        due: list[_Due] = []
        next_at: float | None = None
        for nid, rcpt, attempts, at, expires, msg, sig in rows:
            if (nid, rcpt) in self._inflight:
                continue
            if at <= now:
                due.append(_Due(nid, rcpt, attempts, expires, msg, sig))
            elif next_at is None or at < next_at:
                next_at = at
        if len(rows) == self._batch and next_at is None:
            next_at = now + self._interval  # more rows behind the in-flight ones
        return due, next_at

    def _backoff(self, attempts: int) -> float:
        if not self._exponential:
            return self._interval
        delay = self._interval * math.pow(2, min(attempts - 1, 60))
        return min(delay, self._max_interval)

    async def _attempt(self, d: _Due) -> None:
        try:
            error: str | None = None
            try:
                async with self._limiter:
                    if d.recipient == WEBHOOK:
                        await self._to_webhook(d)
                    else:
                        row = await records.get(self._store, d.recipient)
                        if row is None:
                            await self._finish(d, ABANDONED, "recipient no longer enrolled")
                            return
                        await self._to_agent(d, row)
            except (ClientError, OSError, ValueError, ssl.SSLError) as exc:
                error = str(exc)[:500] or type(exc).__name__
            except Exception as exc:  # a broken recipient record must not stop the other deliveries
                log.exception("event=revocation_attempt_error notice=%s to=%s", d.notice_id, d.recipient)
                error = type(exc).__name__
            if error is None:
                await self._finish(d, DELIVERED, None)
            else:
                await self._failed(d, error)
        except Exception:  # the store failed: the row stays pending and is retried next round
            log.exception("event=outbox.write_failed notice=%s to=%s", d.notice_id, d.recipient)
        finally:
            self._inflight.discard(d.key)
            self.kick()

    async def _finish(self, d: _Due, state: str, error: str | None) -> None:
        now = self._clock()

        def txn(conn: Connection) -> int:
            return conn.execute(
                sa.update(deliveries)
                .where(deliveries.c.notice_id == d.notice_id, deliveries.c.recipient == d.recipient,
                       deliveries.c.state == PENDING)
                .values(state=state, attempts=d.attempts + 1, done_at=now, last_error=error)
            ).rowcount

        await self._store.write(txn)
        ok = state == DELIVERED
        if self._metrics is not None:
            self._metrics.deliveries.labels(state).inc()
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "event=revocation_%s notice=%s to=%s attempts=%d%s", state, d.notice_id, d.recipient,
                d.attempts + 1, f" error={error}" if error else "")

    async def _failed(self, d: _Due, error: str) -> None:
        now = self._clock()
        if now >= d.expires_at:
            await self._finish(d, EXPIRED, error)
            return
        attempts = d.attempts + 1
        delay = self._backoff(attempts)

        def txn(conn: Connection) -> int:
            return conn.execute(
                sa.update(deliveries)
                .where(deliveries.c.notice_id == d.notice_id, deliveries.c.recipient == d.recipient,
                       deliveries.c.state == PENDING)
                .values(attempts=attempts, next_attempt_at=min(now + delay, d.expires_at), last_error=error)
            ).rowcount

        await self._store.write(txn)
        log.info("event=revocation_pending notice=%s to=%s attempts=%d retry_in=%.3g error=%s",
                 d.notice_id, d.recipient, attempts, delay, error)

    async def _to_agent(self, d: _Due, row: dict[str, Any]) -> None:
        host = f"[{row['ip']}]" if ":" in row["ip"] else row["ip"]
        url = f"https://{host}:{row['port']}/v{row['supported_version']}/notifications/revocation"
        ctx = self._context_for(row)
        async with make_client(ctx, timeout=self._timeout) as client:
            await request_json(client, "POST", url, revocation.Notice(d.msg, d.signature).encode(),
                               max_response_bytes=64 << 10, expect=(200, 201, 202, 204))

    async def _to_webhook(self, d: _Due) -> None:
        ctx = ssl.create_default_context()
        for ca in self._webhook_ca_files:
            ctx.load_verify_locations(cafile=str(ca))
        async with make_client(ctx, timeout=self._timeout) as client:
            try:
                resp = await client.post(self._webhook_url, json=revocation.Notice(d.msg, d.signature).encode())
            except httpx.TransportError as exc:
                raise HttpError(599, f"webhook unreachable: {type(exc).__name__}") from exc
            if not 200 <= resp.status_code < 300:
                raise HttpError(resp.status_code, resp.reason_phrase or "webhook refused")


def agent_context_factory(
    ca_files: Iterable[str | Path], client_cert: str | Path, client_key: str | Path
) -> ContextFactory:
    """Contexts for agents: our client cert; trust = CA + the agent's pinned ``mtls_cert``."""
    cas = tuple(ca_files)

    def make(row: dict[str, Any]) -> ssl.SSLContext:
        pinned = row.get("mtls_cert")
        return tls.client_context(cas, client_cert, client_key, pinned_server_cert_pem=pinned)

    return make
