"""Helpers for the tenant tests: a ``World`` (real registrar + verifier actor over mTLS, agents
started on demand on a swtpm), and ``keytrio tenant`` run in-process against it (``make_cli``).
The ``world`` fixture is in tests/actors/conftest.py (the verifier's measured-boot tests use it too)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import trio

from keytrio.actors.registrar.schema import agents as registrar_agents
from keytrio.actors.tenant import Tenant
from keytrio.actors.tenant import cli as tenant_cli
from keytrio.actors.verifier.actor import Verifier
from keytrio.actors.verifier.config import load_config as verifier_config
from tests.actors.agent_support import Running as RunningAgent
from tests.actors.agent_support import start_agent
from tests.actors.registrar_support import Running, registrar_config, running_registrar
from tests.actors.verifier_support import revocation_pair

AGENT_ID = "5c0b3b6e-0000-4000-8000-00000000000a"
OTHER_ID = "5c0b3b6e-0000-4000-8000-00000000000b"


@dataclass
class World:
    registrar: Running
    verifier: Verifier
    verifier_url: str
    pki: Any
    tmp: Path

    def tenant(self, verifier_url: str | None = None, **kw: Any) -> Tenant:
        return Tenant(self.registrar.https_url, verifier_url or self.verifier_url, ca_files=[self.pki.ca],
                      client_cert=self.pki.client.cert, client_key=self.pki.client.key,
                      request_timeout=5.0, poll_interval=0.05, **kw)

    async def agent(self, nursery: trio.Nursery, tcti: str, agent_id: str = AGENT_ID, **kw: Any) -> RunningAgent:
        return await start_agent(nursery, self.tmp / agent_id, self.pki, tcti, uuid=agent_id,
                                 registrar_ip="127.0.0.1", registrar_port=self.registrar.addresses.http[1],
                                 retry_interval=0.1, max_retries=3, **kw)

    async def set_registrar(self, agent_id: str, **values: Any) -> None:
        assert self.registrar.registrar.service is not None

        def txn(conn: sa.Connection) -> None:
            conn.execute(sa.update(registrar_agents).where(registrar_agents.c.agent_id == agent_id).values(**values))

        await self.registrar.registrar.service.store.write(txn)


@contextlib.asynccontextmanager
async def world_running(pki: Any, tmp: Path) -> AsyncIterator[World]:
    async with running_registrar(registrar_config(pki, tmp / "registrar"), pki) as reg:
        cfg = verifier_config(None, env={}, overrides={
            "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "data_dir": str(tmp / "verifier"),
            "server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
            "trusted_client_ca": [str(pki.ca)], "trusted_server_ca": [str(pki.ca)],
            "client_cert": str(pki.client.cert), "client_key": str(pki.client.key),
            "quote_interval": 0.2, "retry_interval": 0.1, "max_retries": 2,
            "exponential_backoff": False, "request_timeout": 5.0, "graceful_timeout": 0.5,
        })
        verifier = Verifier(cfg)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(verifier.run)
            yield World(reg, verifier, f"https://{host}:{port}", pki, tmp)
            nursery.cancel_scope.cancel()



def tenant_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keytrio")
    tenant_cli.register(p.add_subparsers(dest="verb", required=True))
    return p


@dataclass
class Cli:
    """``keytrio tenant`` with a config file (tls_dir, registrar) and ``--verifier`` flags."""

    config: Path
    flags: list[str] = field(default_factory=list)

    async def __call__(self, *argv: str | Path, flags: list[str] | None = None) -> tuple[int, str, str]:
        args = tenant_parser().parse_args(["tenant", *map(str, argv), "-c", str(self.config), *(self.flags if flags is None else flags)])
        out, err = io.StringIO(), io.StringIO()
        code = await tenant_cli.run(args, out=out, err=err, env={})
        return code, out.getvalue(), err.getvalue()

    async def fails(self, code: int, *argv: str | Path, match: str = "", **kw: Any) -> str:
        """Assert exit ``code`` with exactly one stderr line (containing ``match``); return it."""
        got, out, err = await self(*argv, **kw)
        assert got == code, (got, out, err)
        assert err.count("\n") == 1 and err.startswith("keytrio tenant "), err
        assert match in err, err
        assert " -- " in err  # what failed -- what to do
        return err


def tls_layout(directory: Path, pki: Any, *, ca: Path | None = None) -> Path:
    """A cv_ca-style directory for the tenant: CA, client pair, RevocationNotifier pair."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca or pki.ca, directory / "cacert.crt")
    shutil.copy(pki.client.cert, directory / "client-cert.crt")
    shutil.copy(pki.client.key, directory / "client-private.pem")
    pair = revocation_pair(directory)  # writes RevocationNotifier-cert.crt
    (directory / "RevocationNotifier-private.pem").write_text(pair.key_pem)
    return directory


def write_config(path: Path, tls_dir: Path, registrar_url: str, **extra: Any) -> Path:
    host, port = registrar_url.removeprefix("https://").rsplit(":", 1)
    lines = ["[tenant]", f'tls_dir = "{tls_dir}"', f'registrar_ip = "{host}"', f"registrar_tls_port = {port}",
             "request_timeout = 5.0", "wait_timeout = 20.0"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_cli(w: World, tmp: Path, **extra: Any) -> Cli:
    tls_dir = tls_layout(tmp / "cv_ca", w.pki)
    config = write_config(tmp / "tenant.toml", tls_dir, w.registrar.https_url, **extra)
    return Cli(config, ["--verifier", w.verifier_url.removeprefix("https://")])
