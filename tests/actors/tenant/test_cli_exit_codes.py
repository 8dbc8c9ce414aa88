"""The `keytrio` command's real process exit codes (what shells and systemd see), run as a
subprocess of the installed console script: 0 done, 2 usage, 3 connection, 4 verification,
5 refused by a peer (README, tenant row). Every failure is one line on stderr."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.testbed.swtpm_state import ek_ca_certs
from tests.actors.registrar_support import EkCa
from tests.actors.tenant_support import AGENT_ID, world_running
from tests.ports import free_port

KEYTRIO = Path(sys.executable).parent / "keytrio"
UNKNOWN_ID = "0e0e0e0e-0000-4000-8000-0000000000ee"


async def keytrio(*argv: str, cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
    proc = await trio.run_process([str(KEYTRIO), *argv], cwd=cwd, env=env, capture_stdout=True,
                                  capture_stderr=True, check=False, stdin=b"")
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def tls_dir(pki: Any, root: Path) -> Path:
    """The test PKI's client files in the cv_ca layout the tenant's --tls-dir reads."""
    d = root / "cv_ca"
    d.mkdir()
    shutil.copy(pki.ca, d / "cacert.crt")
    shutil.copy(pki.client.cert, d / "client-cert.crt")
    shutil.copy(pki.client.key, d / "client-private.pem")
    return d



@pytest.mark.parametrize("argv", [
    (),  # no verb
    ("frobnicate",),
    ("tenant",),  # no tenant verb
    ("tenant", "status"),  # no AGENT_ID
    ("tenant", "status", AGENT_ID, "--registrar", "no-port-here"),
    ("ca",),
])  # fmt: skip
async def test_usage_errors_exit_2(tmp_path: Path, argv: Sequence[str]) -> None:
    code, out, err = await keytrio(*argv, cwd=tmp_path)
    assert code == 2, (code, out, err)
    assert err.strip() and not out.strip(), (out, err)


async def test_version_and_help_exit_0(tmp_path: Path) -> None:
    code, out, err = await keytrio("--version", cwd=tmp_path)
    assert code == 0 and out.startswith("keytrio "), (code, out, err)
    code, out, err = await keytrio("tenant", "--help", cwd=tmp_path)
    assert code == 0 and "status" in out, (code, out, err)


async def test_unreachable_servers_exit_3(tmp_path: Path, pki: Any) -> None:
    port = free_port()
    code, out, err = await keytrio("tenant", "status", AGENT_ID, "--tls-dir", str(tls_dir(pki, tmp_path)),
                                   "--registrar", f"127.0.0.1:{port}", "--verifier", f"127.0.0.1:{port}",
                                   cwd=tmp_path)
    assert code == 3, (code, out, err)
    assert one_line(err).startswith("keytrio tenant status:"), err


@pytest.mark.swtpm
async def test_refused_5_verification_4_done_0(tmp_path: Path, pki: Any, swtpm: Any, nursery: trio.Nursery) -> None:
    async with world_running(pki, tmp_path / "world") as w:
        agent = await w.agent(nursery, swtpm.tcti)
        conn = ["--tls-dir", str(tls_dir(pki, tmp_path)), "--registrar", w.registrar.https_url.removeprefix("https://"),
                "--verifier", w.verifier_url.removeprefix("https://")]

        # an agent the registrar does not know: refused (404)
        code, out, err = await keytrio("tenant", "status", UNKNOWN_ID, *conn, cwd=tmp_path)
        assert code == 5, (code, out, err)
        assert "404" in one_line(err), err

        # an EK certificate that does not chain to the trust store: verification failed, nothing enrolled
        other = EkCa.new().write(tmp_path / "other-ek-ca")
        code, out, err = await keytrio("tenant", "add", AGENT_ID, *conn, "--ek-trust-store", str(other), "-q",
                                       cwd=tmp_path)
        assert code == 4, (code, out, err)
        assert "EK certificate" in one_line(err), err

        # the right trust store: enrolled, exit 0; status then says Get Quote
        store = tmp_path / "ek-store"
        store.mkdir()
        for pem in ek_ca_certs(swtpm.state_dir):
            shutil.copy(pem, store)
        code, out, err = await keytrio("tenant", "add", AGENT_ID, *conn, "--ek-trust-store", str(store), "-q",
                                       cwd=tmp_path)
        assert code == 0, (code, out, err)
        code, out, err = await keytrio("tenant", "status", AGENT_ID, *conn, "--json", cwd=tmp_path)
        assert code == 0, (code, out, err)
        await agent.stop()
