"""``keytrio <actor>`` as a real process in tests: the service config of a verifier,
its TOML file, a clean environment, and the one-line start-up failure check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from keytrio.actors.common.startup import Exit
from tests.ports import free_port

KEYTRIO = Path(sys.executable).with_name("keytrio")


def toml(actor: str, options: dict[str, Any]) -> str:
    lines = [f"[{actor}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, actor: str, options: dict[str, Any], name: str = "") -> Path:
    path = tmp_path / f"{name or actor}.toml"
    path.write_text(toml(actor, options))
    return path


def env(**extra: str) -> dict[str, str]:
    """This process's environment without KEYTRIO_* variables, plus ``extra``."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
    out.update(extra)
    return out


def clean_env() -> dict[str, str]:
    """No KEYTRIO_* variables and no default config directory (/etc/keytrio is not read)."""
    return env(KEYTRIO_CONFIG_DIR="/nonexistent")


def one_line(r: subprocess.CompletedProcess[str], code: Exit, *needles: str) -> str:
    """The single stderr line of a failed start (exit ``code``, nothing on stdout)."""
    lines = r.stderr.splitlines()
    assert (r.returncode, len(lines), r.stdout) == (code, 1, ""), r.stderr
    line = lines[0]
    assert " -- " in line, line  # what failed -- what to do
    for needle in needles:
        assert needle in line, line
    return line


def verifier_options(pki: Any, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A `keytrio verifier` service config on a free port (no metrics listener)."""
    opts: dict[str, Any] = {
        "ip": "127.0.0.1", "port": free_port(), "metrics_port": -1, "data_dir": str(data_dir),
        "server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
        "client_cert": str(pki.client.cert), "client_key": str(pki.client.key),
        "trusted_client_ca": [str(pki.ca)], "trusted_server_ca": [str(pki.ca)], "graceful_timeout": 0.5,
    }
    opts.update(overrides)
    return opts
