"""The Verifier actor: store, HTTPS API, one monitor per enrolled agent, revocation notices.

    verifier = Verifier(load_config(path))
    host, port = await nursery.start(verifier.run)

Everything lives in the actor's own nursery (no global state: two verifiers in one process work).
At start the database is migrated to the current schema (``auto_migrate_db``), then the actor
resumes monitoring every stored agent of its ``verifier_id`` in an active state (each from its
stored progress: counters, TPM clock, IMA line) and resumes the revocation outbox's pending
deliveries. Several verifiers may share one PostgreSQL database: each only monitors, and only
delivers the notices of, its own ``verifier_id``.
Cancelling ``run`` is a clean shutdown: monitors are cancelled, the listener stops (in-flight
requests get ``graceful_timeout``), then the database is closed.

With ``port = 0`` the bound port is reported by ``task_status``; the agent records' ``verifier_port``
then show the configured value (0), as the app is built before the socket is bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import trio

from actors.common.config import Config
from actors.common.serve import serve
from actors.common.store import Store, parse_pool
from actors.common.tls import server_context
from actors.verifier import records
from actors.verifier.app import build_app
from actors.verifier.config import Settings, resolve
from actors.verifier.ima import ImaHooks
from actors.verifier.migrations import MIGRATIONS
from actors.verifier.monitor import ACTIVE_STATES, ImaCheckFactory, MonitorSet, MonitorSettings
from actors.verifier.notify import Outbox, agent_context_factory
from actors.verifier.policies import PolicyStore

log = logging.getLogger("keytrio.verifier")


class Verifier:
    """``Verifier(config).run()``; ``clock`` gives wall-clock epoch seconds (tests may pass their own)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        ima_check_for: ImaCheckFactory | None = None,
    ) -> None:
        self.config = config
        self.settings: Settings = resolve(config)  # raises ConfigError before anything starts
        self.clock = clock
        self.ima_check_for = ima_check_for
        self.address: tuple[str, int] | None = None
        self.monitors: MonitorSet | None = None
        self.notifier: Outbox | None = None
        self.store: Store | None = None
        self.policies: PolicyStore | None = None
        self.ima: ImaHooks | None = None  # the IMA hooks (per-agent debug counters: ima.hooks[id].parsed)

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        s, cfg = self.settings, self.config
        tls = server_context(s.server_cert, s.server_key, client_ca_files=s.trusted_client_ca, mode="optional")
        contexts = agent_context_factory(s.trusted_server_ca, s.client_cert, s.client_key)
        if s.database_url.startswith("sqlite") and not cfg.database_url:
            await trio.to_thread.run_sync(partial(s.data_dir.mkdir, parents=True, exist_ok=True))
        pool_size, max_overflow = parse_pool(cfg.database_pool_sz_ovfl)
        store = await Store.open(s.database_url, pool_size=pool_size, max_overflow=max_overflow,
                                 migrations=MIGRATIONS, auto_migrate=cfg.auto_migrate_db)
        self.store = store
        try:
            policies = PolicyStore(store, require_signatures=cfg.require_allow_list_signatures, clock=self.clock)
            await policies.load()  # every stored policy parsed once, before any monitor starts
            self.policies = policies
            ima_check_for = self.ima_check_for
            if ima_check_for is None:
                self.ima = ImaHooks(policies, ignore_tomtou_errors=cfg.ignore_tomtou_errors)
                ima_check_for = self.ima
            async with trio.open_nursery() as nursery:
                notifier = Outbox(
                    store,
                    verifier_id=cfg.verifier_id,
                    context_for=contexts,
                    webhook_url=cfg.webhook_url,
                    webhook_ca_files=s.trusted_server_ca,
                    retry_interval=max(cfg.retry_interval, 0.05),
                    max_retry_interval=cfg.revocation_max_retry_interval,
                    exponential=cfg.exponential_backoff,
                    timeout=cfg.request_timeout,
                    ttl=cfg.revocation_notice_ttl,
                    clock=self.clock,
                )
                monitors = MonitorSet(
                    store,
                    nursery=nursery,
                    settings=MonitorSettings(
                        quote_interval=cfg.quote_interval,
                        retry_interval=cfg.retry_interval,
                        max_retries=cfg.max_retries,
                        exponential_backoff=cfg.exponential_backoff,
                        request_timeout=cfg.request_timeout,
                        max_response_size=cfg.max_response_size,
                    ),
                    context_for=contexts,
                    notifier=notifier,
                    max_concurrent_requests=cfg.max_concurrent_requests,
                    clock=self.clock,
                    ima_check_for=ima_check_for,
                )
                self.notifier, self.monitors = notifier, monitors
                app = build_app(
                    store,
                    verifier_id=cfg.verifier_id,
                    ip=cfg.ip,
                    port=lambda: self.address[1] if self.address else cfg.port,
                    trusted_client_ca=s.trusted_client_ca,
                    max_upload_size=cfg.max_upload_size,
                    quote_interval=cfg.quote_interval,
                    clock=self.clock,
                    on_enrolled=monitors.start,
                    on_deleted=monitors.stop,
                    on_stop=monitors.stop,
                    on_reactivate=monitors.reactivate,
                    policies=policies,
                    ignore_tomtou_errors=cfg.ignore_tomtou_errors,
                )
                bound = await nursery.start(
                    partial(serve, app, host=cfg.ip, port=cfg.port, ssl_context=tls,
                            graceful_timeout=cfg.graceful_timeout)
                )
                await nursery.start(notifier.run)  # pending deliveries of a previous run resume
                resumed = 0
                for row in await records.list_all(store, cfg.verifier_id):
                    if row["operational_state"] in ACTIVE_STATES:
                        monitors.start(row["agent_id"])
                        resumed += 1
                self.address = (bound[0], bound[1])
                log.info("event=verifier.started verifier_id=%s https=%s:%d resumed=%d",
                         cfg.verifier_id, *bound, resumed)
                task_status.started(self.address)
        finally:
            if self.monitors is not None:
                self.monitors.stop_all()
            with trio.CancelScope(shield=True):
                await store.close()
            log.info("event=verifier.stopped")
