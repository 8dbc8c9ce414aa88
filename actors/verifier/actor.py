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

``keytrio verifier`` with ``workers`` > 1 runs this actor in N processes (workers.py): each is
given the listening sockets its supervisor bound (``listeners``) and runs as a cluster instance.

With ``port = 0`` the bound port is reported by ``task_status``; the agent records' ``verifier_port``
then show the configured value (0), as the app is built before the socket is bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa
import trio

from keytrio.actors.common import startup
from keytrio.actors.common.app import KeytrioApp
from keytrio.actors.common.config import Config
from keytrio.actors.common.metrics import serve_metrics
from keytrio.actors.common.private_files import private_dir
from keytrio.actors.common.serve import serve
from keytrio.actors.common.server_options import tls_files
from keytrio.actors.common.store import Store, parse_pool
from keytrio.actors.common.tls import ReloadingServerContext, client_context, reloading_server_context
from keytrio.actors.verifier import records
from keytrio.actors.verifier.app import build_app
from keytrio.actors.verifier.config import ACTOR, TLS_OPTIONS, Settings, commit_lingers, resolve
from keytrio.actors.verifier.ima import ImaHooks
from keytrio.actors.verifier.leases import Cluster, PushTimers
from keytrio.actors.verifier.metrics import VerifierMetrics
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.monitor import ACTIVE_STATES, ImaCheckFactory, MonitorSet, MonitorSettings
from keytrio.actors.verifier.notify import ContextFactory, Outbox, agent_context_factory
from keytrio.actors.verifier.policies import PolicyStore
from keytrio.actors.verifier.push.routes import register as register_push_routes
from keytrio.actors.verifier.push.service import Hooks, PushService, PushSettings, is_push
from keytrio.actors.verifier.push.store import forget_agent
from keytrio.actors.verifier.schema import agents as agents_table

log = logging.getLogger("keytrio.verifier")


@dataclass(frozen=True)
class Listeners:
    """Listening sockets bound (and shared) by the workers supervisor: the API's and the metrics'."""

    api: list[trio.SocketListener]
    metrics: list[trio.SocketListener]


def load_tls(settings: Settings, config: Config) -> tuple[ReloadingServerContext, ContextFactory]:
    """The server context and the agents' client-context factory; StartupError(TLS) if a file fails."""
    s = settings
    files = tls_files(config, TLS_OPTIONS)
    tls = startup.load_tls(lambda: reloading_server_context(
        s.server_cert, s.server_key, client_ca_files=s.trusted_client_ca, mode="optional",
        crl_files=[s.crl] if s.crl is not None else []), files)
    # the agent contexts are made per agent; one made now proves the client cert and key load
    startup.load_tls(lambda: client_context(s.trusted_server_ca, s.client_cert, s.client_key), files)
    return tls, agent_context_factory(s.trusted_server_ca, s.client_cert, s.client_key)


@dataclass(frozen=True)
class _Ready:
    """What Verifier._start_up acquired; Verifier._shut_down releases it."""

    lock: startup.DataDirLock | None
    tls: ReloadingServerContext
    contexts: ContextFactory  #: the per-agent mTLS client contexts
    api: list[trio.SocketListener]
    metrics: list[trio.SocketListener]
    store: Store


class PolicyReadyMonitors:
    """The MonitorSet as the cluster leases drive it: a monitor starts once its agent's runtime
    policy is loaded here. Another process (a worker, another instance) may have accepted the
    policy at enrolment; without this the first poll here would fail the agent (policy missing)
    until the next ``policy_refresh_interval``."""

    def __init__(self, monitors: MonitorSet, store: Store, policies: PolicyStore, nursery: trio.Nursery) -> None:
        self.monitors, self.store, self.policies, self.nursery = monitors, store, policies, nursery
        self._pending: dict[str, trio.CancelScope] = {}

    @property
    def running(self) -> set[str]:
        return self.monitors.running | set(self._pending)

    def start(self, agent_id: str) -> None:
        if agent_id in self.running:
            return
        scope = self._pending[agent_id] = trio.CancelScope()
        self.nursery.start_soon(self._start, agent_id, scope)

    def stop(self, agent_id: str) -> None:
        scope = self._pending.pop(agent_id, None)
        if scope is not None:
            scope.cancel()
        self.monitors.stop(agent_id)

    async def _start(self, agent_id: str, scope: trio.CancelScope) -> None:
        with scope:
            try:
                row = await records.get(self.store, agent_id)
                if row is not None:
                    await self.policies.ensure(row.get("runtime_policy_name") or None,
                                               row.get("runtime_policy_checksum") or None)
            except Exception:  # the monitor starts anyway: a policy still missing fails closed
                log.warning("event=verifier.policy_load_failed agent=%s", agent_id, exc_info=True)
        if self._pending.get(agent_id) is scope:  # not stopped meanwhile
            del self._pending[agent_id]
            self.monitors.start(agent_id)


class Verifier:
    """``Verifier(config).run()``; ``clock`` gives wall-clock epoch seconds (tests may pass their own)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        ima_check_for: ImaCheckFactory | None = None,
        listeners: Listeners | None = None,
    ) -> None:
        self.config = config
        #: sockets bound by a supervisor (workers.py) instead of binding ``port``/``metrics_port`` here
        self._inherited = listeners
        self.settings: Settings = resolve(config)  # raises ConfigError before anything starts
        self.clock = clock
        self.ima_check_for = ima_check_for
        self.address: tuple[str, int] | None = None
        self.monitors: MonitorSet | None = None
        self.notifier: Outbox | None = None
        self.store: Store | None = None
        self.app: KeytrioApp | None = None  # the served app while running (its url_map lists the routes)
        self.policies: PolicyStore | None = None
        self.cluster: Cluster | None = None  # cluster = true: the agent leases (leases.py)
        self.push: PushService | None = None  # mode push/both: the v3.0 service (push/service.py)
        self.ima: ImaHooks | None = None  # the IMA hooks (ima.hooks[id]: the running monitors' hooks)
        self.metrics = VerifierMetrics()  # per instance: its own Prometheus registry
        self.metrics_address: tuple[str, int] | None = None  # None while not serving / disabled
        #: seconds between two recounts of the gauges (agents per state, pending notices)
        self.gauge_interval = 1.0
        #: freeze the start-up heap once serving (startup.freeze_heap): set by the process entry
        #: points (make_service, the worker), which own their process; tests and embedders do not
        self.freeze_heap = False

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        ready = await self._start_up()
        self.store = self.metrics.store = store = ready.store
        try:
            policies = await self._load_policies(store)
            async with trio.open_nursery() as nursery:
                self.notifier = notifier = self._outbox(store, ready.contexts)
                self.monitors = monitors = self._monitor_set(store, nursery, ready.contexts, notifier)
                self.push = self._push_service(store, nursery, notifier)
                self.cluster = self._cluster(store, monitors, notifier, nursery)
                self.app = app = self._app(store, monitors, policies)
                bound = await nursery.start(partial(
                    serve, app, listeners=ready.api, ssl_context=ready.tls, graceful_timeout=cfg.graceful_timeout))
                resumed = await self._resume(nursery, store, monitors, notifier)
                if cfg.policy_refresh_interval > 0:
                    nursery.start_soon(self._refresh_policies, policies, cfg.policy_refresh_interval)
                self.address = (bound[0], bound[1])
                metrics_at = await self._serve_metrics(nursery, ready.metrics)
                log.info("event=verifier.started verifier_id=%s https=%s:%d metrics=%s crl=%s resumed=%d",
                         cfg.verifier_id, *bound, metrics_at, self.settings.crl or "none", resumed)
                if self.freeze_heap:
                    startup.freeze_heap()
                task_status.started(self.address)
        finally:
            await self._shut_down(ready)

    # --- the steps of run ------------------------------------------------------------------------

    async def _start_up(self) -> _Ready:
        """Lock the data dir, load TLS, bind every port, and only then open and migrate the
        database (startup.py): a start that fails leaves nothing half done."""
        s, cfg = self.settings, self.config
        lock = None
        if s.database_url.startswith("sqlite") and not cfg.database_url:  # SQLite in data_dir
            await startup.data_dir_ready(s.data_dir, private_dir)  # holds secrets: 0700
            lock = await startup.lock_data_dir(s.data_dir, ACTOR)
        api: list[trio.SocketListener] = []
        metrics_listeners: list[trio.SocketListener] = []
        try:
            tls, contexts = load_tls(s, cfg)
            if self._inherited is not None:
                api, metrics_listeners = self._inherited.api, self._inherited.metrics
            else:
                api = await startup.bind(cfg.ip, cfg.port, option="port")
            if cfg.metrics_port >= 0 and self._inherited is None:
                metrics_listeners = await startup.bind(cfg.metrics_ip, cfg.metrics_port, option="metrics_port")
            pool_size, max_overflow = parse_pool(cfg.database_pool_sz_ovfl)
            store = await startup.open_store(s.database_url, pool_size=pool_size, max_overflow=max_overflow,
                                             migrations=MIGRATIONS, auto_migrate=cfg.auto_migrate_db)
        except BaseException:
            await startup.close_all([*api, *metrics_listeners])
            if lock is not None:
                lock.release()
            raise
        return _Ready(lock=lock, tls=tls, contexts=contexts, api=api, metrics=metrics_listeners, store=store)

    async def _load_policies(self, store: Store) -> PolicyStore:
        """Every stored runtime policy parsed once, before any monitor starts; the IMA hooks."""
        cfg = self.config
        policies = PolicyStore(store, require_signatures=cfg.require_allow_list_signatures, clock=self.clock,
                               parses=self.metrics.policy_parses)
        await policies.load()
        self.policies = policies
        if self.ima_check_for is None:
            self.ima = ImaHooks(policies, ignore_tomtou_errors=cfg.ignore_tomtou_errors,
                                lines_per_poll=self.metrics.ima_lines_per_poll)
        return policies

    def _ima_check_for(self) -> ImaCheckFactory | None:
        """The IMA check of each agent: the one given to the actor, else its own ImaHooks."""
        return self.ima_check_for if self.ima_check_for is not None else self.ima

    def _outbox(self, store: Store, contexts: ContextFactory) -> Outbox:
        cfg = self.config
        return Outbox(
            store,
            verifier_id=cfg.verifier_id,
            context_for=contexts,
            webhook_url=cfg.webhook_url,
            webhook_ca_files=self.settings.trusted_server_ca,
            retry_interval=max(cfg.retry_interval, 0.05),
            max_retry_interval=cfg.revocation_max_retry_interval,
            exponential=cfg.exponential_backoff,
            timeout=cfg.request_timeout,
            ttl=cfg.revocation_notice_ttl,
            clock=self.clock,
            metrics=self.metrics,
        )

    def _monitor_set(
        self, store: Store, nursery: trio.Nursery, contexts: ContextFactory, notifier: Outbox
    ) -> MonitorSet:
        cfg = self.config
        return MonitorSet(
            store,
            nursery=nursery,
            settings=MonitorSettings(
                quote_interval=cfg.quote_interval,
                retry_interval=cfg.retry_interval,
                max_retries=cfg.max_retries,
                exponential_backoff=cfg.exponential_backoff,
                request_timeout=cfg.request_timeout,
                max_response_size=cfg.max_response_size,
                # reuse an agent's connection from one quote to the next (a closed one is
                # seen before use, and a request that gets no reply byte is sent again once);
                # twice the interval, so that a verifier falling behind its interval does not
                # add a TLS handshake to every poll just when it is short of CPU
                keepalive_expiry=max(4.0, 2 * cfg.quote_interval + 10.0),
                measured_boot_evaluate=cfg.measured_boot_evaluate,
                # success records of many polls share one thread hop and commit (docs/performance.md):
                # commit_linger, auto min(0.25 s, quote_interval / 8)
                write_linger=commit_lingers(cfg)[0],
            ),
            context_for=contexts,
            notifier=notifier,
            max_concurrent_requests=cfg.max_concurrent_requests,
            clock=self.clock,
            ima_check_for=self._ima_check_for(),
            metrics=self.metrics,
        )

    def _push_service(self, store: Store, nursery: trio.Nursery, notifier: Outbox) -> PushService | None:
        """Mode push/both: the v3.0 service for push agents; None in pull mode."""
        cfg = self.config
        if cfg.mode == "pull":
            return None
        # a push request's write (urgent: its agent waits) may wait push_commit_linger for others to
        # share its commit and fsync, twice per cycle; auto: at most 5 % of the interval (docs/performance.md
        # 4c.8: at 100 ms the cycle stays within 10 % of the interval, and the CPU per attestation
        # is ≈ 1.3 ms below a lone commit per request and ≈ 0.2 ms above the full linger at 50 agents)
        store.urgent_linger = commit_lingers(cfg)[1]
        return PushService(
            store, verifier_id=cfg.verifier_id, nursery=nursery, notifier=notifier,
            settings=PushSettings(quote_interval=cfg.quote_interval, session_lifetime=cfg.session_lifetime,
                                  history=cfg.attestation_history),
            ima_check_for=self._ima_check_for(), clock=self.clock,
            policy_ready=self.policies.ensure if self.policies is not None else None,
            policy_loaded=self.policies.loaded if self.policies is not None else None)

    def _app(self, store: Store, monitors: MonitorSet, policies: PolicyStore) -> KeytrioApp:
        """The REST app; with a push service its hooks tell push agents from pull ones, and its
        v3.0 routes join the app."""
        cfg = self.config
        hooks: Any = Hooks(monitors, self.push) if self.push is not None else None
        if self.cluster is not None:  # routes only kick the leases; the holder runs the monitor
            hooks = self.cluster.hooks(forget=partial(forget_agent, store) if self.push is not None else None)
        app = build_app(
            store,
            verifier_id=cfg.verifier_id,
            ip=cfg.ip,
            port=lambda: self.address[1] if self.address else cfg.port,
            trusted_client_ca=self.settings.trusted_client_ca,
            max_upload_size=cfg.max_upload_size,
            max_evidence_size=cfg.max_evidence_size,
            max_policy_size=cfg.max_policy_size,
            quote_interval=cfg.quote_interval,
            clock=self.clock,
            on_enrolled=hooks.on_enrolled if hooks else monitors.start,
            on_deleted=hooks.on_deleted if hooks else monitors.stop,
            on_stop=hooks.on_stop if hooks else monitors.stop,
            on_reactivate=hooks.on_reactivate if hooks else monitors.reactivate,
            policies=policies,
            ignore_tomtou_errors=cfg.ignore_tomtou_errors,
            mode=cfg.mode,
        )
        if self.push is not None:
            register_push_routes(app, self.push)
        app.require_client_eku = cfg.require_client_eku
        return app

    def _cluster(self, store: Store, monitors: MonitorSet, notifier: Outbox, nursery: trio.Nursery) -> Cluster | None:
        """cluster = true: the leases that decide which monitors, push timers (and whether the
        outbox) run here."""
        cfg = self.config
        if not cfg.cluster:
            return None
        push = None
        if self.push is not None:
            push = PushTimers(store, nursery, service_deadlines=self.push.deadlines,
                              max_interval=self.push.settings.max_interval, timed_out=self.push.verifier.timed_out,
                              clock=self.clock)
        assert self.policies is not None
        ready = PolicyReadyMonitors(monitors, store, self.policies, nursery)
        return Cluster(store, verifier_id=cfg.verifier_id, monitors=ready, push=push, outbox=notifier.run,
                       ttl=cfg.lease_ttl, clock=self.clock,
                       renew_interval=min(cfg.lease_ttl / 3, max(cfg.quote_interval, 0.1)))

    async def _resume(self, nursery: trio.Nursery, store: Store, monitors: MonitorSet, notifier: Outbox) -> int:
        """Resume the outbox's pending deliveries and the monitors (cluster: those of the leases
        taken at the first renewal); how many agents resumed."""
        if self.cluster is not None:
            await nursery.start(self.cluster.run)
            return len(monitors.running)
        await nursery.start(notifier.run)  # pending deliveries of a previous run resume
        return await self._resume_monitors(store, monitors)

    async def _resume_monitors(self, store: Store, monitors: MonitorSet) -> int:
        """Start a monitor for every stored pull agent of this verifier in an active state, and the
        push service's deadlines; how many agents resumed."""
        resumed = 0
        for row in await records.list_all(store, self.config.verifier_id):
            if row["operational_state"] in ACTIVE_STATES and not is_push(row):
                monitors.start(row["agent_id"])
                resumed += 1
        if self.push is not None:
            resumed += await self.push.resume()
        return resumed

    async def _serve_metrics(self, nursery: trio.Nursery, listeners: list[trio.SocketListener]) -> str:
        """Gauges and the metrics listener, if enabled; where it listens (for the log line)."""
        if self.config.metrics_port < 0 or (self._inherited is not None and not listeners):
            return "disabled"
        await self.refresh_gauges()
        nursery.start_soon(self._gauges)
        mhost, mport = await nursery.start(partial(
            serve_metrics, self.metrics.metrics, listeners=listeners, health=self.health))
        self.metrics_address = (mhost, mport)
        return f"{mhost}:{mport}"

    async def _shut_down(self, ready: _Ready) -> None:
        self.metrics_address = None
        if self.monitors is not None:
            self.monitors.stop_all()
        if self.push is not None:
            self.push.stop_all()
        await startup.close_all([*ready.api, *ready.metrics])  # any never served
        with trio.CancelScope(shield=True):
            await ready.store.close()
        if ready.lock is not None:
            ready.lock.release()
        log.info("event=verifier.stopped")

    async def refresh_gauges(self) -> None:
        """Recount this verifier's agents per operational state and its pending notice deliveries."""
        store, verifier_id = self.store, self.config.verifier_id
        assert store is not None

        def q(conn: sa.Connection) -> dict[int, int]:
            rows = conn.execute(
                sa.select(agents_table.c.operational_state, sa.func.count())
                .where(agents_table.c.verifier_id == verifier_id)
                .group_by(agents_table.c.operational_state))
            return {int(state): int(n) for state, n in rows}

        self.metrics.set_agents(await store.read(q))
        if self.notifier is not None:
            self.metrics.pending.set(sum((await self.notifier.pending_counts()).values()))

    async def _gauges(self) -> None:
        while True:
            await trio.sleep(self.gauge_interval)
            try:
                await self.refresh_gauges()
            except Exception:  # a database hiccup: the gauges keep their values, /health reports it
                log.debug("event=verifier.gauge_refresh_failed", exc_info=True)

    async def _refresh_policies(self, policies: PolicyStore, interval: float) -> None:
        # other verifiers on the same database may change named policies (PostgreSQL scale-out)
        while True:
            await trio.sleep(interval)
            try:
                await policies.refresh()
            except Exception:  # a database hiccup: the policies in memory stay in use
                log.warning("event=verifier.policy_refresh_failed", exc_info=True)

    async def health(self) -> dict[str, Any]:
        """/health: the store answers a trivial SELECT (within 5 s); the monitor count for context."""
        store = self.store
        if store is None:
            return {"ok": False, "store": "not open"}
        details: dict[str, Any] = {"ok": False, "store": "timeout"}
        with trio.move_on_after(5.0):
            try:
                await store.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar())
                details = {"ok": True, "store": "ok"}
            except Exception as exc:  # any database failure means unhealthy, never a 500
                details = {"ok": False, "store": f"unreachable ({type(exc).__name__})"}
        details["monitors"] = len(self.monitors.running) if self.monitors is not None else 0
        return details
