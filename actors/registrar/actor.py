"""The Registrar actor: one store, two listeners, one housekeeping task, all in its own nursery.

    registrar = Registrar(load_config(path))
    addresses = await nursery.start(registrar.run)   # RegistrarAddresses(http=(h, p), https=(h, p))

Cancelling ``run`` shuts it down cleanly: listeners stop, in-flight requests get
``graceful_timeout`` seconds, then the database is closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio
from cryptography import x509

from keytrio.actors.common import startup
from keytrio.actors.common.app import KeytrioApp
from keytrio.actors.common.config import Config
from keytrio.actors.common.metrics import serve_metrics
from keytrio.actors.common.private_files import private_dir
from keytrio.actors.common.serve import serve
from keytrio.actors.common.server_options import tls_files
from keytrio.actors.common.store import Store, parse_pool
from keytrio.actors.common.tls import ReloadingServerContext, reloading_server_context
from keytrio.actors.registrar.app import build_admin_app, build_agent_app
from keytrio.actors.registrar.config import ACTOR, TLS_OPTIONS, Settings, resolve
from keytrio.actors.registrar.ekcert import load_cert_store
from keytrio.actors.registrar.migrations import MIGRATIONS
from keytrio.actors.registrar.service import RegistrarMetrics, RegistrarService

log = logging.getLogger("keytrio.registrar")


@dataclass(frozen=True)
class RegistrarAddresses:
    http: tuple[str, int]  # agents: register, activate
    https: tuple[str, int]  # tenant / verifier (mTLS)
    metrics: tuple[str, int] | None = None  # /metrics + /health (plain HTTP); None when disabled


@dataclass(frozen=True)
class _Ready:
    """What start-up acquired, for serving and for the shut-down that releases it."""

    store: Store
    cert_store: list[x509.Certificate]
    tls: ReloadingServerContext
    listeners: list[list[trio.SocketListener]]


def sweep_interval(activation_timeout: float) -> float:
    """How often expired registrations are looked for: a quarter of the timeout, 50 ms .. 30 s."""
    return min(max(activation_timeout / 4, 0.05), 30.0)


class Registrar:
    """``Registrar(config).run()``; ``clock`` gives wall-clock epoch seconds (tests may pass their own)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.settings: Settings = resolve(config)  # raises ConfigError before anything starts
        self.clock = clock
        self.addresses: RegistrarAddresses | None = None
        self.service: RegistrarService | None = None
        #: the served apps by port kind ("agent", "admin") while running: their url_map lists the routes
        self.apps: dict[str, KeytrioApp] = {}
        self.metrics = RegistrarMetrics()  # per instance: its own Prometheus registry
        #: seconds between two recounts of the ``agents`` gauge
        self.gauge_interval = 1.0

    async def run(
        self, *, task_status: trio.TaskStatus[RegistrarAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Order (startup.py): lock the data dir, load TLS and the EK CAs, bind every port, and
        # only then open and migrate the database: a start that fails leaves nothing half done.
        lock = await self._lock_data_dir()
        ready: _Ready | None = None
        try:
            ready = await self._start_up()
            self.service = self._service(ready.store, ready.cert_store)
            async with trio.open_nursery() as nursery:
                self.addresses = await self._serve(nursery, self.service, ready)
                task_status.started(self.addresses)
        finally:
            if ready is not None:
                await self._shut_down(ready)
            if lock is not None:
                lock.release()
            if ready is not None:
                log.info("event=registrar.stopped")

    async def _lock_data_dir(self) -> startup.DataDirLock | None:
        """SQLite in the data dir (the default): the dir holds secrets (0700) and one registrar."""
        s, cfg = self.settings, self.config
        if not (s.database_url.startswith("sqlite") and not cfg.database_url):
            return None
        await startup.data_dir_ready(s.data_dir, private_dir)
        return await startup.lock_data_dir(s.data_dir, ACTOR)

    async def _start_up(self) -> _Ready:
        """EK CAs, TLS, every port bound, then the store: on a failure what was bound is closed."""
        s, cfg = self.settings, self.config
        listeners: list[list[trio.SocketListener]] = []
        try:
            cert_store = []
            if s.tpm_cert_store is not None:
                cert_store = await trio.to_thread.run_sync(load_cert_store, s.tpm_cert_store)
            tls = startup.load_tls(lambda: reloading_server_context(
                s.server_cert, s.server_key, client_ca_files=s.trusted_client_ca, mode="optional",
                crl_files=[s.crl] if s.crl is not None else [],
            ), tls_files(cfg, TLS_OPTIONS))
            for host, port, option in ((cfg.ip, cfg.port, "port"), (cfg.ip, cfg.tls_port, "tls_port"),
                                       (cfg.metrics_ip, cfg.metrics_port, "metrics_port")):
                if port >= 0:
                    listeners.append(await startup.bind(host, port, option=option))
            pool_size, max_overflow = parse_pool(cfg.database_pool_sz_ovfl)
            # migrated to the current schema at start (auto_migrate_db), else checked to be current
            store = await startup.open_store(s.database_url, pool_size=pool_size, max_overflow=max_overflow,
                                             migrations=MIGRATIONS, auto_migrate=cfg.auto_migrate_db)
        except BaseException:
            for bound in listeners:
                await startup.close_all(bound)
            raise
        return _Ready(store, cert_store, tls, listeners)

    def _service(self, store: Store, cert_store: list[x509.Certificate]) -> RegistrarService:
        cfg = self.config
        return RegistrarService(store, activation_timeout=cfg.activation_timeout, require_ek_cert=cfg.require_ek_cert,
                                cert_store=cert_store, clock=self.clock, metrics=self.metrics)

    def _build_apps(self, service: RegistrarService) -> tuple[KeytrioApp, KeytrioApp]:
        s, cfg = self.settings, self.config
        agent_app = build_agent_app(service, max_upload_size=cfg.max_upload_size)
        admin_app = build_admin_app(service, trusted_client_ca=s.trusted_client_ca, max_upload_size=cfg.max_upload_size)
        admin_app.require_client_eku = cfg.require_client_eku
        self.apps = {"agent": agent_app, "admin": admin_app}
        return agent_app, admin_app

    async def _serve(self, nursery: trio.Nursery, service: RegistrarService, ready: _Ready) -> RegistrarAddresses:
        """The plain (agents) and mTLS (admin) listeners, the sweeper and /metrics, in ``nursery``."""
        s, cfg = self.settings, self.config
        agent_app, admin_app = self._build_apps(service)
        listeners = ready.listeners
        http = await nursery.start(
            partial(serve, agent_app, listeners=listeners[0], graceful_timeout=cfg.graceful_timeout)
        )
        https = await nursery.start(
            partial(serve, admin_app, listeners=listeners[1], ssl_context=ready.tls,
                    graceful_timeout=cfg.graceful_timeout)
        )
        nursery.start_soon(self._sweeper, service)
        metrics_at = None
        if cfg.metrics_port >= 0:
            await service.refresh_gauges()
            nursery.start_soon(self._gauges, service)
            metrics_at = await nursery.start(partial(
                serve_metrics, self.metrics.metrics, listeners=listeners[2], health=service.health))
            metrics_at = (metrics_at[0], metrics_at[1])
        log.info("event=registrar.started http=%s:%d https=%s:%d metrics=%s crl=%s", *http, *https,
                 f"{metrics_at[0]}:{metrics_at[1]}" if metrics_at else "disabled", s.crl or "none")
        return RegistrarAddresses(tuple(http), tuple(https), metrics_at)

    async def _shut_down(self, ready: _Ready) -> None:
        for bound in ready.listeners:  # those never served (a failure before their serve started)
            await startup.close_all(bound)
        with trio.CancelScope(shield=True):
            await ready.store.close()

    async def _gauges(self, service: RegistrarService) -> None:
        while True:
            await trio.sleep(self.gauge_interval)
            try:
                await service.refresh_gauges()
            except Exception:  # a database hiccup: the gauge keeps its last value, /health reports it
                log.debug("event=registrar.gauge_refresh_failed", exc_info=True)

    async def _sweeper(self, service: RegistrarService) -> None:
        interval = sweep_interval(self.config.activation_timeout)
        while True:
            await trio.sleep(interval)
            try:
                await service.sweep()
            except Exception:  # a database hiccup must not stop the registrar; retried next round
                log.exception("event=registrar.sweep_failed")
