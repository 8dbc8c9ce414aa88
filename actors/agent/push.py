"""Push mode (API v3.0): the agent opens every connection and listens on no port.

Start sequence: data dir (locked) -> the verifier's CA file readable -> TPM (TCTI) -> EK (+ cert)
-> AK (saved blobs reloaded) -> agent id -> register + activate with the registrar (no contact
address and no mTLS cert: nobody connects to a push agent) -> ``task_status.started(("", 0))``
-> the attestation loop (actors/agent/push_loop.py) until cancelled.

No NK, no PCR 16 binding, no payloads and no revocation listener: those serve the pull model's
verifier -> agent channel, which push mode does not have. No /metrics listener either: a push
agent binds nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from keytrio.actors.agent import identity, lifecycle
from keytrio.actors.agent.lifecycle import AgentHost, AgentInfo
from keytrio.actors.agent.push_client import VerifierClient
from keytrio.actors.agent.push_evidence import EvidenceSource
from keytrio.actors.agent.push_loop import Backoff, PushAttester
from keytrio.actors.agent.registration import Registration
from keytrio.actors.common import startup, tls
from keytrio.actors.common.startup import Exit, StartupError

log = logging.getLogger("keytrio.agent")

NO_ADDRESS = ("", 0)  # what task_status reports: a push agent serves nothing


async def run_push(agent: AgentHost, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    cfg = agent.config
    lock = await lifecycle.lock_data_dir(cfg.data_dir)
    try:
        ca = Path(cfg.verifier_tls_ca_cert)
        startup.check_readable([("verifier_tls_ca_cert", ca)])
        try:
            ssl_ctx = await trio.to_thread.run_sync(lambda: tls.client_context([ca]))
        except (OSError, ValueError) as exc:
            raise StartupError(Exit.TLS, f"verifier_tls_ca_cert {ca}: {exc}",
                               "give the PEM CA certificate of the verifier's server certificate") from exc
        await _run(agent, ssl_ctx, task_status)
    finally:
        lock.release()


async def _run(agent: AgentHost, ssl_ctx: object, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    cfg = agent.config
    async with await lifecycle.open_tpm(cfg) as tpm:
        agent.tpm = tpm
        try:
            ident = await identity.setup(tpm, cfg.data_dir, uuid_setting=cfg.uuid, ek_handle=cfg.ek_handle,
                                         encryption_alg=cfg.tpm_encryption_alg, signing_alg=cfg.tpm_signing_alg,
                                         hash_alg=cfg.tpm_hash_alg)
            await Registration(
                tpm_timer=agent.metrics.tpm_seconds.labels("activate_credential"),
                registrar_ip=cfg.registrar_ip, registrar_port=cfg.registrar_port,
                contact_ip=None, contact_port=None, mtls_cert=None,
                retries=cfg.max_retries, interval=cfg.retry_interval, exponential=cfg.exponential_backoff,
            ).run(tpm, ident)
            attester = PushAttester(
                agent_id=ident.agent_id,
                client=VerifierClient(cfg.verifier_url, ssl_ctx, timeout=cfg.verifier_timeout),  # type: ignore[arg-type]
                evidence=EvidenceSource(tpm=tpm, ak=ident.ak, hash_alg=cfg.tpm_hash_alg,
                                        boottime_source=Path(cfg.boottime_source),
                                        ima_ml_path=Path(cfg.ima_ml_path),
                                        measuredboot_ml_path=Path(cfg.measuredboot_ml_path)),
                interval=cfg.attestation_interval_seconds,
                backoff=Backoff(cfg.backoff_initial_delay, cfg.backoff_max_delay),
            )
            agent.push = attester
            agent.info = AgentInfo(agent_id=ident.agent_id, address=NO_ADDRESS, nk_pem="", mtls_cert="",
                                   ek_public=ident.ek.public, ek_cert_der=ident.ek.cert_der,
                                   ak_public=ident.ak.public, hash_alg=cfg.tpm_hash_alg)
            task_status.started(NO_ADDRESS)
            log.info("agent=%s event=push_mode verifier=%s", ident.agent_id, cfg.verifier_url)
            await attester.run()
        finally:
            agent.tpm = None
