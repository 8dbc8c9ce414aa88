"""Revocation notices: build + sign one per failure, deliver it to every agent of this verifier.

* :func:`build_notice` makes a :class:`SignedNotice` from the failing agent's record and the
  failure (``protocol.revocation.build_message`` / ``sign_message``; an empty signature when the
  agent was enrolled without a ``revocation_key``, as upstream does). Each notice has its own
  ``notice_id`` (uuid4) so agents drop re-sent duplicates.
* :class:`Notifier` is the interface the monitor uses (``await publish(notice)``);
  :class:`HttpNotifier` delivers at once, in the background of the actor's nursery: POST
  ``/v{supported_version}/notifications/revocation`` to every agent row of ``verifier_id`` (the
  failing one included), each over its own pinned mTLS client, concurrently (bounded), with a few
  retries and backoff; and to ``webhook_url`` when configured. ``publish`` returns once the
  delivery is scheduled: the durability issue swaps in an outbox whose ``publish`` returns once
  the notice is committed, behind the same interface.
"""

from __future__ import annotations

import logging
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import trio
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from actors.common import tls
from actors.common.client import ClientError, HttpError, make_client, request_json, retry
from actors.common.store import Store
from actors.verifier import records
from protocol import revocation
from protocol.failures import Failure

log = logging.getLogger("keytrio.verifier")

NOTICE_RETRIES = 3  # per recipient, after the first attempt
NOTICE_TIMEOUT = 10.0  # seconds per attempt
NOTICE_CONCURRENCY = 16  # recipients contacted at once (per notifier)


@dataclass(frozen=True)
class SignedNotice:
    """The wire body ``{"msg", "signature"}`` plus what logs need."""

    agent_id: str  # the failing agent
    notice_id: str
    event_id: str
    msg: str
    signature: str

    def body(self) -> dict[str, str]:
        return {"msg": self.msg, "signature": self.signature}


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

    async def publish(self, notice: SignedNotice) -> None: ...


#: agent row -> SSL context for talking to that agent (pinned mtls_cert + our client cert)
ContextFactory = Callable[[dict[str, Any]], ssl.SSLContext]


class HttpNotifier:
    """Deliver each notice to every agent of ``verifier_id`` (and the webhook), in ``nursery``."""

    def __init__(
        self,
        store: Store,
        *,
        verifier_id: str,
        nursery: trio.Nursery,
        context_for: ContextFactory,
        webhook_url: str = "",
        webhook_ca_files: Iterable[str | Path] = (),
        retries: int = NOTICE_RETRIES,
        retry_interval: float = 0.5,
        exponential: bool = True,
        timeout: float = NOTICE_TIMEOUT,
        concurrency: int = NOTICE_CONCURRENCY,
    ) -> None:
        self._store = store
        self._verifier_id = verifier_id
        self._nursery = nursery
        self._context_for = context_for
        self._webhook_url = webhook_url
        self._webhook_ca_files = tuple(webhook_ca_files)
        self._retries = retries
        self._interval = retry_interval
        self._exponential = exponential
        self._timeout = timeout
        self._limiter = trio.CapacityLimiter(concurrency)
        #: (notice_id, recipient agent id or "webhook", True if delivered) - for tests and status
        self.deliveries: list[tuple[str, str, bool]] = []
        self.published: list[SignedNotice] = []  # every notice of this run (tests, status)

    async def publish(self, notice: SignedNotice) -> None:
        log.info("agent=%s event=revocation_notice notice=%s event_id=%s",
                 notice.agent_id, notice.notice_id, notice.event_id)
        self.published.append(notice)
        self._nursery.start_soon(self._deliver, notice)

    async def _deliver(self, notice: SignedNotice) -> None:
        try:
            rows = await records.list_all(self._store, self._verifier_id)
        except Exception:  # the database is gone (shutdown); nothing to deliver to
            log.exception("agent=%s event=revocation_recipients_failed notice=%s", notice.agent_id, notice.notice_id)
            return
        async with trio.open_nursery() as nursery:
            for row in rows:
                nursery.start_soon(self._to_agent, notice, row)
            if self._webhook_url:
                nursery.start_soon(self._to_webhook, notice)

    async def _attempts(self, notice: SignedNotice, recipient: str, send: Callable[[], Any]) -> None:
        def on_retry(attempt: int, exc: Exception, delay: float) -> None:
            log.info("event=revocation_retry notice=%s to=%s attempt=%d error=%s",
                     notice.notice_id, recipient, attempt, exc)

        delivered = False
        try:
            async with self._limiter:
                await retry(send, retries=self._retries, interval=self._interval,
                            exponential=self._exponential, on_retry=on_retry)
            delivered = True
        except ClientError as exc:
            log.warning("event=revocation_undelivered notice=%s to=%s error=%s", notice.notice_id, recipient, exc)
        except Exception:  # a broken recipient record must not stop the other deliveries
            log.exception("event=revocation_undelivered notice=%s to=%s", notice.notice_id, recipient)
        self.deliveries.append((notice.notice_id, recipient, delivered))

    async def _to_agent(self, notice: SignedNotice, row: dict[str, Any]) -> None:
        aid = row["agent_id"]
        host = f"[{row['ip']}]" if ":" in row["ip"] else row["ip"]
        url = f"https://{host}:{row['port']}/v{row['supported_version']}/notifications/revocation"
        try:
            ctx = self._context_for(row)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("event=revocation_undelivered notice=%s to=%s error=%s", notice.notice_id, aid, exc)
            self.deliveries.append((notice.notice_id, aid, False))
            return
        async with make_client(ctx, timeout=self._timeout) as client:

            async def send() -> None:
                await request_json(client, "POST", url, notice.body(), max_response_bytes=64 << 10)

            await self._attempts(notice, aid, send)

    async def _to_webhook(self, notice: SignedNotice) -> None:
        ctx = ssl.create_default_context()
        for ca in self._webhook_ca_files:
            ctx.load_verify_locations(cafile=str(ca))
        async with make_client(ctx, timeout=self._timeout) as client:

            async def send() -> None:
                try:
                    resp = await client.post(self._webhook_url, json=notice.body())
                except httpx.TransportError as exc:
                    raise HttpError(599, f"webhook unreachable: {type(exc).__name__}") from exc
                if not 200 <= resp.status_code < 300:
                    raise HttpError(resp.status_code, resp.reason_phrase or "webhook refused")

            await self._attempts(notice, "webhook", send)


def agent_context_factory(
    ca_files: Iterable[str | Path], client_cert: str | Path, client_key: str | Path
) -> ContextFactory:
    """Contexts for agents: our client cert; trust = CA + the agent's pinned ``mtls_cert``."""
    cas = tuple(ca_files)

    def make(row: dict[str, Any]) -> ssl.SSLContext:
        pinned = row.get("mtls_cert")
        return tls.client_context(cas, client_cert, client_key, pinned_server_cert_pem=pinned)

    return make
