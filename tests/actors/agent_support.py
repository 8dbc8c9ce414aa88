"""Helpers for tests that run a real agent (actors.agent.actor.Agent on a swtpm, over mTLS):
``start_agent`` in a nursery, a ``Running`` handle with an mTLS client pinned to its cert, and
reply checks. The ``running`` fixture is in tests/actors/agent/conftest.py."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from keytrio.actors.agent.actor import Agent
from keytrio.actors.agent.lifecycle import AgentInfo
from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.registrar.actor import Registrar
from keytrio.actors.registrar.config import load_config as registrar_load_config
from keytrio.protocol.quote_check import check_pcr16, check_quote

BOOTTIME = 1_700_000_000
NONCE = "abcdefghij0123456789"


@dataclass
class Running:
    agent: Agent
    info: AgentInfo
    scope: trio.CancelScope
    client: httpx.AsyncClient
    base: str  # https://127.0.0.1:port/v2.1
    root: str  # https://127.0.0.1:port
    data_dir: Path
    ima_path: Path
    done: trio.Event

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(self.base + path, params=params or None)

    async def post(self, path: str, body: Any) -> httpx.Response:
        return await self.client.post(self.base + path, json=body)

    async def stop(self) -> None:
        """Cancel the agent and wait until its shutdown (TPM closed, tmpfs unmounted) is over."""
        self.scope.cancel()
        await self.client.aclose()
        with trio.fail_after(10):
            await self.done.wait()


def agent_options(tmp: Path, pki: Any, tcti: str, **overrides: Any) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    boot = tmp / "boottime"
    if not boot.exists():
        boot.write_text(f"{BOOTTIME}\n")
    opts: dict[str, Any] = {
        "tcti": tcti,
        "ip": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "data_dir": str(tmp / "agent-data"),
        "trusted_client_ca": [str(pki.ca)],
        "boottime_source": str(boot),
        "ima_ml_path": str(tmp / "ima.log"),
        "measuredboot_ml_path": str(tmp / "uefi.bin"),
        "secure_mount": "never",
        "action_timeout": 10.0,
    }
    opts.update(overrides)
    return opts


def client_for(pki: Any, info: AgentInfo, *, cert: Any = "default") -> httpx.AsyncClient:
    files = pki.client if cert == "default" else cert
    ctx = tls.client_context(
        [pki.ca],
        files.cert if files else None,
        files.key if files else None,
        pinned_server_cert_pem=info.mtls_cert,
    )
    return make_client(ctx, timeout=20.0)


async def start_agent(nursery: trio.Nursery, tmp: Path, pki: Any, tcti: str, **overrides: Any) -> Running:
    opts = agent_options(tmp, pki, tcti, **overrides)
    agent = Agent.from_options(**opts)
    scope = trio.CancelScope()
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await agent.run(task_status=task_status)
        finally:
            done.set()

    host, port = await nursery.start(run)
    assert agent.info is not None
    root = f"https://{host}:{port}"
    return Running(agent, agent.info, scope, client_for(pki, agent.info), root + "/v2.1", root,
                   Path(opts["data_dir"]), Path(opts["ima_ml_path"]), done)


def results(resp: httpx.Response, code: int = 200) -> dict[str, Any]:
    assert resp.status_code == code, resp.text
    body = resp.json()
    assert body["code"] == code
    return body["results"]


def verify_quote(r: Running, res: dict[str, Any], nonce: str = NONCE) -> dict[int, bytes]:
    check = check_quote(res["quote"], ak_public=r.info.ak_public, nonce=nonce, hash_alg=res["hash_alg"])
    assert check.valid, check.failures
    assert check_pcr16(check.bank, check.pcrs, r.info.nk_pem) is None
    return check.pcrs


def registrar_for_agents(pki: Any, tmp: Path, port: int = 0) -> Registrar:
    """A registrar on 127.0.0.1 (``port`` 0: any) with its data in ``tmp/registrar``."""
    return Registrar(registrar_load_config(None, env={}, overrides={
        "metrics_port": 0, "ip": "127.0.0.1", "port": port, "tls_port": 0, "data_dir": str(tmp / "registrar"),
        "server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
        "trusted_client_ca": [str(pki.ca)], "graceful_timeout": 0.5,
    }))


async def registrar_record(pki: Any, https: tuple[str, int], agent_id: str) -> dict[str, Any]:
    """The registrar's record of ``agent_id`` over its mTLS port ``https``."""
    ctx = tls.client_context([pki.ca], pki.client.cert, pki.client.key)
    async with make_client(ctx) as c:
        return results(await c.get(f"https://127.0.0.1:{https[1]}/v2.1/agents/{agent_id}"))


def revocation_key_and_cert() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """An RSA key and its self-signed cert, like upstream's RevocationNotifier pair."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RevocationNotifier")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert
