"""Our registrar and verifier on a CA made by `keytrio ca init`, and upstream's tenant pointed at
them: shared by the interop tests that drive upstream's tenant against keytrio's servers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from keytrio.actors.ca.authority import Authority
from keytrio.actors.registrar import config as registrar_config
from keytrio.actors.registrar.actor import Registrar, RegistrarAddresses
from keytrio.actors.verifier import config as verifier_config
from keytrio.actors.verifier.actor import Verifier
from keytrio.testbed.pki import CaFiles
from tests.interop.support import Upstream, free_ports, run_tools


@dataclass
class OurServers:
    ca: CaFiles
    registrar: RegistrarAddresses
    verifier: tuple[str, int]
    verifier_actor: Verifier

    @property
    def verifier_url(self) -> str:
        return f"https://{self.verifier[0]}:{self.verifier[1]}"


@asynccontextmanager
async def our_servers(root: Path, **verifier_options: Any) -> AsyncIterator[OurServers]:
    """``verifier_options`` override the verifier's config (e.g. ``mode="push"``)."""
    ca_dir = root / "cv_ca"
    Authority.init(ca_dir)  # `keytrio ca init --dir ca_dir`: upstream's cv_ca file names
    reg_cfg = registrar_config.load_config(env={}, overrides={
        "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(root / "registrar"), "tls_dir": str(ca_dir),
    })
    # a fixed port: with port 0 our verifier's records say verifier_port 0, and upstream's tenant
    # (delete) connects to the verifier_ip/verifier_port a record names
    (vport,) = free_ports(1)
    ver_cfg = verifier_config.load_config(env={}, overrides={
        "metrics_port": 0, "ip": "127.0.0.1", "port": vport, "data_dir": str(root / "verifier"), "tls_dir": str(ca_dir),
        "quote_interval": 1.0, "retry_interval": 0.5, **verifier_options,
    })
    async with trio.open_nursery() as nursery:
        registrar = await nursery.start(Registrar(reg_cfg).run)
        verifier_actor = Verifier(ver_cfg)
        verifier = await nursery.start(verifier_actor.run)
        try:
            yield OurServers(CaFiles(ca_dir), registrar, verifier, verifier_actor)
        finally:
            nursery.cancel_scope.cancel()


def upstream_tenant_env(upstream: Upstream, servers: OurServers, work: Path) -> dict[str, str]:
    """Upstream's tenant environment, its tenant.conf pointing at our servers and our CA."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "tpm_cert_store").mkdir(exist_ok=True)
    conf = work / "tenant.conf"
    conf.write_text(f"""[tenant]
version = 2.6
verifier_ip = {servers.verifier[0]}
verifier_port = {servers.verifier[1]}
registrar_ip = {servers.registrar.https[0]}
registrar_port = {servers.registrar.https[1]}
tls_dir = {servers.ca.dir}
enable_agent_mtls = True
client_key = client-private.pem
client_key_password =
client_cert = client-cert.crt
trusted_server_ca = ["cacert.crt"]
tpm_cert_store = {work / "tpm_cert_store"}
max_payload_size = 1048576
accept_tpm_hash_algs = ['sha512', 'sha384', 'sha256']
accept_tpm_encryption_algs = ['ecc', 'rsa']
accept_tpm_signing_algs = ['ecschnorr', 'rsassa']
exponential_backoff = True
retry_interval = 1
max_retries = 5
request_timeout = 60
require_ek_cert = False
ek_check_script =
mb_refstate =
""")
    return {**upstream.env, "KEYLIME_TENANT_CONFIG": str(conf), "KEYLIME_DIR": str(work)}


async def registered_and_policy(upstream: Upstream, env: dict[str, str], agent_id: str, ima_path: Path,
                                policy: Path, measured: str) -> None:
    """Upstream's tenant lists the agent on our registrar (``reglist``) while its ``keylime-policy``
    writes a runtime policy from the machine's IMA log to ``policy`` that holds ``measured``."""
    reglist, _ = await run_tools(
        ([*upstream.tool("keylime_tenant"), "-c", "reglist"], env),
        ([*upstream.tool("keylime-policy"), "create", "runtime", "-m", str(ima_path), "-o", str(policy)], env),
    )
    assert agent_id in reglist.stdout, reglist.describe()
    assert measured in json.loads(policy.read_text())["digests"], policy.read_text()
