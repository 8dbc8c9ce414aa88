"""The agent actor: ``await nursery.start(Agent(config).run)`` -> the bound (host, port).

Start sequence: data dir (locked) -> bind the HTTPS (+ metrics) port -> TPM (TCTI) -> EK (+ cert)
-> AK (saved blobs reloaded) -> agent id -> NK + self-signed mTLS cert -> PCR 16 := H(NK PEM) in
every active bank -> secure dir -> serve on the bound port -> register + activate with the
registrar (if ``registrar_ip`` is set; retried with backoff while it is unreachable) ->
``task_status.started(bound)``. The port is bound first so that a port in use fails the start
before the TPM is touched, and so that ``port = 0`` works: the registered port is
``contact_port`` or the bound one.

Everything lives in this object and its nursery (no module state): several agents, each on its
own TPM and data dir, can run in one process. Cancellation is a clean shutdown: the server stops,
running scripts are killed, the tmpfs (if we mounted it) is unmounted and the TPM context closed
(transient EK/AK flushed).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keytrio.actors.agent import config as agent_config
from keytrio.actors.agent import datadir, identity, lifecycle, push
from keytrio.actors.agent.app import build_app
from keytrio.actors.agent.keys import Keys
from keytrio.actors.agent.lifecycle import AgentInfo
from keytrio.actors.agent.push_loop import PushAttester
from keytrio.actors.agent.quotes import AgentMetrics, QuoteSource
from keytrio.actors.agent.registration import Registration, RegistrationError
from keytrio.actors.agent.revocation import Revocations
from keytrio.actors.agent.runner import Runner
from keytrio.actors.agent.secure import SecureDir
from keytrio.actors.agent.tpm import Tpm
from keytrio.actors.common import startup, tls
from keytrio.actors.common.app import KeytrioApp
from keytrio.actors.common.config import Config
from keytrio.actors.common.metrics import serve_metrics
from keytrio.actors.common.serve import serve

log = logging.getLogger("keytrio.agent")


class AgentConfigError(ValueError):
    pass


@dataclass(frozen=True)
class _Nk:
    """The agent's NK (its mTLS and U-decryption key) with its public PEM and self-signed cert."""

    key: rsa.RSAPrivateKey
    pem: str
    cert_pem: str


@dataclass(frozen=True)
class _Parts:
    """What a running agent serves: built before the port is served."""

    tpm: Tpm
    runner: Runner
    keys: Keys
    app: KeytrioApp


class Agent:
    def __init__(self, config: Config) -> None:
        if not config.trusted_client_ca and config.mode != "push":
            raise AgentConfigError("trusted_client_ca: at least one CA file is required")
        if config.crl and not Path(config.crl).is_file():
            raise AgentConfigError(f"crl: no such file {config.crl}")
        if (exposed := tls.private_key_problem(Path(config.data_dir) / datadir.NK_KEY)) is not None:
            raise AgentConfigError(exposed)
        self.config = config
        self.info: AgentInfo | None = None
        self.runner: Runner | None = None
        self.keys: Keys | None = None
        self.tpm: Tpm | None = None  # the opened TPM while running (the testbed extends PCRs through it)
        self.app: KeytrioApp | None = None  # the served app while running (its url_map lists the routes)
        self.metrics = AgentMetrics()  # per instance: its own Prometheus registry
        self.metrics_address: tuple[str, int] | None = None  # /metrics + /health while serving
        self.push: PushAttester | None = None  # push mode's attestation loop while running

    @classmethod
    def from_options(cls, **overrides: object) -> Agent:
        """An agent from defaults + ``overrides`` (no file, no environment): for tests/testbed."""
        return cls(agent_config.load(None, env={}, overrides=overrides))

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        if cfg.mode == "push":
            await push.run_push(self, task_status)  # binds no port: started with ("", 0)
            return
        # Order (common/startup.py): data dir locked, CA files readable and every port bound before
        # the TPM is touched, so a port in use or a second agent on this data dir changes nothing.
        lock = await lifecycle.lock_data_dir(cfg.data_dir)
        listeners: list[trio.SocketListener] = []
        metrics_listeners: list[trio.SocketListener] = []
        try:
            startup.check_readable([*(("trusted_client_ca", Path(p)) for p in cfg.trusted_client_ca),
                                    *((("crl", Path(cfg.crl)),) if cfg.crl else ())])
            listeners = await startup.bind(cfg.ip, cfg.port, option="port")
            if cfg.metrics_port >= 0:
                metrics_listeners = await startup.bind(cfg.metrics_ip, cfg.metrics_port, option="metrics_port")
            await self._run(listeners, metrics_listeners, task_status)
        finally:
            await startup.close_all([*listeners, *metrics_listeners])  # any never served
            lock.release()

    async def _run(self, listeners: list[trio.SocketListener], metrics_listeners: list[trio.SocketListener],
                   task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        cfg = self.config
        contact_ip = cfg.contact_ip or cfg.ip
        revocation_cert = await self._configured_revocation_cert()
        async with await lifecycle.open_tpm(cfg) as tpm:
            self.tpm = tpm
            ident = await identity.setup(
                tpm,
                cfg.data_dir,
                uuid_setting=cfg.uuid,
                ek_handle=cfg.ek_handle,
                encryption_alg=cfg.tpm_encryption_alg,
                signing_alg=cfg.tpm_signing_alg,
                hash_alg=cfg.tpm_hash_alg,
            )
            nk = await self._bind_nk(tpm, contact_ip)
            secure = await self._secure_dir()
            try:
                parts = await self._build(tpm, ident, nk, secure, revocation_cert)
                await self._serve(parts, ident, nk, contact_ip, listeners, metrics_listeners, task_status)
            finally:
                self.tpm = None
                self.metrics_address = None
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(secure.release)

    # -- the start-up steps, in order ------------------------------------------------------------------

    async def _configured_revocation_cert(self) -> x509.Certificate | None:
        """``revocation_cert`` of the configuration (a payload may bring its own later)."""
        path = self.config.revocation_cert
        if path is None:
            return None
        try:
            pem = await trio.to_thread.run_sync(Path(path).read_bytes)
            return x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError) as exc:
            raise AgentConfigError(f"revocation_cert {path}: {exc}") from exc

    async def _bind_nk(self, tpm: Tpm, contact_ip: str) -> _Nk:
        """The NK and its self-signed mTLS cert (made once), bound into PCR 16 of every active bank."""
        cfg = self.config
        nk, nk_pem, cert_pem = await trio.to_thread.run_sync(datadir.load_or_create_nk, cfg.data_dir, contact_ip)
        banks = await identity.bind_nk(tpm, nk_pem)
        if cfg.tpm_hash_alg not in banks:
            raise AgentConfigError(f"tpm_hash_alg {cfg.tpm_hash_alg}: that PCR bank is not active on the TPM")
        return _Nk(nk, nk_pem, cert_pem)

    async def _secure_dir(self) -> SecureDir:
        cfg = self.config
        secure = SecureDir(
            Path(cfg.secure_dir) if cfg.secure_dir else cfg.data_dir / "secure",
            size=agent_config.parse_size(cfg.secure_size),
            mount=cfg.secure_mount,
        )
        await trio.to_thread.run_sync(secure.prepare)
        return secure

    async def _build(self, tpm: Tpm, ident: identity.Identity, nk: _Nk, secure: SecureDir,
                     revocation_cert: x509.Certificate | None) -> _Parts:
        """The runner, revocation handling, U/V keys, quote source and the REST app over them."""
        cfg = self.config
        agent_id = ident.agent_id
        runner = Runner(timeout=cfg.action_timeout, run_as=cfg.run_as, agent_id=agent_id)
        revocations = Revocations(
            agent_id=agent_id,
            data_dir=cfg.data_dir,
            runner=runner,
            actions_dir=Path(cfg.revocation_actions_dir) if cfg.revocation_actions_dir else None,
            configured_cert=revocation_cert,
        )
        await trio.to_thread.run_sync(revocations.load_seen)
        if secure.unzipped.is_dir():
            # a payload unpacked before a restart keeps its revocation cert and actions
            await trio.to_thread.run_sync(revocations.use_payload, secure.unzipped)
        keys = Keys(
            agent_id=agent_id,
            nk_private=nk.key,
            secure_dir=secure,
            runner=runner,
            enable_autorun=cfg.enable_autorun,
            on_payload=self._counting(revocations.use_payload),
        )
        quotes = QuoteSource(
            tpm=tpm,
            ak=ident.ak,
            hash_alg=cfg.tpm_hash_alg,
            enc_alg=ident.enc_alg,
            sign_alg=ident.sign_alg,
            nk_pem=nk.pem,
            boottime_source=Path(cfg.boottime_source),
            ima_ml_path=Path(cfg.ima_ml_path),
            measuredboot_ml_path=Path(cfg.measuredboot_ml_path),
            metrics=self.metrics,
        )
        app = build_app(
            trusted_client_ca=list(cfg.trusted_client_ca),
            max_upload_size=cfg.max_upload_size,
            nk_pem=nk.pem,
            quotes=quotes,
            keys=keys,
            revocations=revocations,
            metrics=self.metrics,
        )
        app.require_client_eku = cfg.require_client_eku
        self.app = app
        return _Parts(tpm, runner, keys, app)

    async def _serve(self, parts: _Parts, ident: identity.Identity, nk: _Nk, contact_ip: str,
                     listeners: list[trio.SocketListener], metrics_listeners: list[trio.SocketListener],
                     task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        """Serve on the bound port(s), register with the registrar, then report started."""
        cfg = self.config
        ssl_ctx = await trio.to_thread.run_sync(self._server_context, cfg.data_dir)
        failure: RegistrationError | None = None
        async with trio.open_nursery() as nursery:
            parts.runner.attach(nursery)
            self.runner, self.keys = parts.runner, parts.keys
            bound = await nursery.start(
                functools.partial(serve, parts.app, listeners=listeners, ssl_context=ssl_ctx,
                                  keep_alive_timeout=cfg.keep_alive_timeout)
            )
            contact_port = cfg.contact_port or bound[1]
            if cfg.metrics_port >= 0:
                # before registering: /health answers while registration is retried
                mhost, mport = await nursery.start(functools.partial(
                    serve_metrics, self.metrics.metrics, listeners=metrics_listeners,
                    health=self.health))
                self.metrics_address = (mhost, mport)
                log.info("agent=%s event=metrics_serving address=%s:%d", ident.agent_id, mhost, mport)
            if cfg.registrar_ip:
                try:
                    await self._register(parts.tpm, ident, contact_ip, contact_port, nk.cert_pem)
                except RegistrationError as exc:
                    # re-raised bare below, not inside the nursery's ExceptionGroup
                    failure = exc
                    nursery.cancel_scope.cancel()
            if failure is None:
                self._started(ident.agent_id, bound, nk.pem, nk.cert_pem, ident, task_status)
        if failure is not None:
            raise failure

    async def _register(
        self, tpm: Tpm, ident: identity.Identity, contact_ip: str, contact_port: int, cert_pem: str
    ) -> None:
        cfg = self.config
        await Registration(
            tpm_timer=self.metrics.tpm_seconds.labels("activate_credential"),
            registrar_ip=cfg.registrar_ip,
            registrar_port=cfg.registrar_port,
            contact_ip=contact_ip,
            contact_port=contact_port,
            mtls_cert=cert_pem,
            retries=cfg.max_retries,
            interval=cfg.retry_interval,
            exponential=cfg.exponential_backoff,
        ).run(tpm, ident)

    def _started(
        self,
        agent_id: str,
        bound: tuple[str, int],
        nk_pem: str,
        cert_pem: str,
        ident: identity.Identity,
        task_status: trio.TaskStatus[tuple[str, int]],
    ) -> None:
        self.info = AgentInfo(
            agent_id=agent_id,
            address=bound,
            nk_pem=nk_pem,
            mtls_cert=cert_pem,
            ek_public=ident.ek.public,
            ek_cert_der=ident.ek.cert_der,
            ak_public=ident.ak.public,
            hash_alg=self.config.tpm_hash_alg,
        )
        log.info("agent=%s event=serving address=%s:%d", agent_id, *bound)
        task_status.started(bound)

    def _server_context(self, data_dir: Path) -> tls.ReloadingServerContext:
        crl = self.config.crl
        return tls.reloading_server_context(
            data_dir / datadir.NK_CERT,
            data_dir / datadir.NK_KEY,
            client_ca_files=list(self.config.trusted_client_ca),
            mode="required",
            # a client cert revoked with `keytrio ca revoke` fails the next handshake (no restart)
            crl_files=[crl] if crl else [],
        )

    def _counting(self, use_payload: Any) -> Any:
        """``on_payload`` that also counts unpacked payloads (called in a worker thread)."""

        def on_payload(unzipped: Path | None) -> None:
            if unzipped is not None:
                self.metrics.payloads.inc()
            use_payload(unzipped)

        return on_payload

    async def health(self) -> dict[str, Any]:
        """/health: the TPM context is open (the agent holds it for its whole run)."""
        tpm_open = self.tpm is not None
        return {"ok": tpm_open, "tpm": "open" if tpm_open else "closed",
                "agent_id": self.info.agent_id if self.info is not None else None}
