"""A real registrar and verifier in the test's nursery, for the simulated-agent bench tests
(tests/test_bench_sim.py pull, tests/test_bench_push.py push): plain-HTTP registrar with its TLS
port, verifier with mTLS, certificates from the testbed's CV CA in ``ca``."""

from pathlib import Path
from typing import Any

import trio

from keytrio.actors.registrar.actor import Registrar
from keytrio.actors.registrar.config import load_config as registrar_config
from keytrio.actors.verifier.actor import Verifier
from keytrio.actors.verifier.config import load_config as verifier_config


async def start_registrar(nursery: trio.Nursery, ca: Path, data: Path) -> str:
    """The registrar's plain-HTTP base URL."""
    opts = {
        "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(data), "metrics_port": -1,
        "server_cert": str(ca / "server-cert.crt"), "server_key": str(ca / "server-private.pem"),
        "trusted_client_ca": [str(ca / "cacert.crt")], "graceful_timeout": 0.5,
    }  # fmt: skip
    addrs = await nursery.start(Registrar(registrar_config(None, env={}, overrides=opts)).run)
    return f"http://127.0.0.1:{addrs.http[1]}"


async def start_verifier(nursery: trio.Nursery, ca: Path, data: Path, **options: Any) -> str:
    """The verifier's HTTPS base URL; ``options`` are verifier config options (quote_interval,
    mode, retries, ...)."""
    opts = {
        "ip": "127.0.0.1", "port": 0, "metrics_port": -1, "data_dir": str(data),
        "server_cert": str(ca / "server-cert.crt"), "server_key": str(ca / "server-private.pem"),
        "client_cert": str(ca / "client-cert.crt"), "client_key": str(ca / "client-private.pem"),
        "trusted_client_ca": [str(ca / "cacert.crt")], "trusted_server_ca": [str(ca / "cacert.crt")],
        "graceful_timeout": 0.5, **options,
    }  # fmt: skip
    host, port = await nursery.start(Verifier(verifier_config(env={}, overrides=opts)).run)
    return f"https://{host}:{port}"
