"""Interop support: a real upstream Keylime 7.14.3 (verifier + registrar) for the whole session.

``upstream`` runs the project's ``tests/interop/upstream/up.sh DIR`` once per session (SQLite, its
own CA in ``DIR/work/cv_ca``, loopback ports chosen here) and ``down.sh DIR`` at the end. The
upstream venv is kept across runs (``KEYTRIO_KL_VENV``, default ``~/.cache/keytrio-klvenv``): on a
fresh machine ``upstream/venv.sh`` creates it with pip (``upstream/requirements.txt``: keylime==7.14.3
and its pinned dependencies) and links Debian's ``python3-gpg`` into it; later bring-ups take seconds.

Nothing here fakes a peer and nothing is skipped (issue 9): when up.sh cannot run (a tool missing,
no package index reachable on the first run) or fails, the tests fail with its output. Setting
KEYTRIO_SKIP_INTEROP=1 skips them knowingly (a machine that cannot reach the package index); under
CI=true that skip fails the run like any other (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common import client as http
from keytrio.actors.common import tls
from keytrio.testbed.machine import Machine
from keytrio.testbed.pki import CaFiles

INTEROP_DIR = Path(__file__).resolve().parent / "upstream"  # up.sh, down.sh, venv.sh, instance.py
KL_VENV = Path(os.environ.get("KEYTRIO_KL_VENV", Path.home() / ".cache/keytrio-klvenv"))
UP_TIMEOUT = 900.0  # a first run pip-installs upstream into KL_VENV
# upstream verifier operational states (keylime/common/states.py)
GET_QUOTE, INVALID_QUOTE = 3, 9


@dataclass
class Upstream:
    """One running upstream instance (see upstream/instance.py): its dir, tenant environment and URLs."""

    dir: Path
    env: dict[str, str] = field(repr=False)
    groups: list[int] = field(default_factory=list)  # launcher process groups, for a last-resort stop

    @property
    def ca(self) -> CaFiles:
        return CaFiles(self.dir / "work" / "cv_ca")

    @property
    def verifier_url(self) -> str:
        return self.env["KL_VERIFIER_URL"]

    @property
    def registrar_tls_url(self) -> str:
        return self.env["KL_REGISTRAR_TLS_URL"]

    @property
    def registrar_agent_address(self) -> tuple[str, int]:
        """The plain-HTTP registrar port agents register with."""
        host, port = self.env["KL_REGISTRAR_URL"].removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def tool(self, name: str) -> list[str]:
        """argv prefix of an upstream console script, run by the venv's python (never through the
        script's shebang, which names whatever path pip was run with when the venv was made)."""
        return tool_argv((self.dir / "venv").resolve(), name)

    def log(self, component: str) -> str:
        try:
            return (self.dir / "logs" / f"{component}.log").read_text(errors="replace")
        except OSError:
            return ""


def _read_env_sh(path: Path) -> dict[str, str]:
    """The ``export NAME="value"`` lines of up.sh's env.sh (PATH expanded against ours)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("export "):
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        (word,) = shlex.split(value)
        env[name] = word.replace("$PATH", os.environ.get("PATH", ""))
    return env


def tool_argv(venv: Path, name: str) -> list[str]:
    """argv prefix that runs upstream's console script ``name`` from ``venv`` by its python."""
    return [str(venv / "bin" / "python"), str(venv / "bin" / name)]


def require_tools() -> None:
    if os.environ.get("KEYTRIO_SKIP_INTEROP") == "1":
        pytest.skip("KEYTRIO_SKIP_INTEROP=1")
    for tool in ("bash", "flock", "python3", "swtpm", "swtpm_setup"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed: the interop tests cannot run here (./scripts/setup installs it)")


def ensure_venv() -> Path:
    """The upstream venv (upstream/venv.sh: made once, pip-installing keylime 7.14.3; then cached)."""
    require_tools()
    env = {**os.environ, "KEYTRIO_KL_VENV": str(KL_VENV)}
    env.pop("VIRTUAL_ENV", None)  # never pip-install into keytrio's own venv
    try:
        proc = subprocess.run(["bash", str(INTEROP_DIR / "venv.sh")], env=env, capture_output=True, text=True,
                              timeout=UP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"venv.sh timed out after {UP_TIMEOUT}s: {exc.stderr!r}")
    if proc.returncode != 0:
        pytest.fail(f"venv.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip())


def free_ports(count: int) -> list[int]:
    """Bindable loopback ports below the kernel's ephemeral range (32768+): instance.py's own
    choice (port 0) is an ephemeral port that outgoing connections of parallel test runs can take before the
    upstream server binds it (seen as "Address already in use")."""
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def bring_up(directory: Path, extra_env: Mapping[str, str] | None = None, *, attempts: int = 3) -> Upstream:
    """up.sh into ``directory/try<n>``; retried (new ports) only when a port was taken meanwhile."""
    failure = ""
    for attempt in range(attempts):
        d = directory / f"try{attempt}"
        vport, rport, rtls = free_ports(3)
        ports = {"VERIFIER_PORT": str(vport), "REGISTRAR_PORT": str(rport), "REGISTRAR_TLS_PORT": str(rtls)}
        env = {**os.environ, "KEYTRIO_KL_VENV": str(KL_VENV), **ports, **(extra_env or {})}
        env.pop("VIRTUAL_ENV", None)  # never let upstream inherit keytrio's own venv
        try:
            proc = subprocess.run(["bash", str(INTEROP_DIR / "up.sh"), str(d)], env=env, capture_output=True,
                                  text=True, timeout=UP_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            bring_down(d)
            pytest.fail(f"up.sh timed out after {UP_TIMEOUT}s: {exc.stderr!r}")
        if proc.returncode == 0:
            return Upstream(d, _read_env_sh(d / "env.sh"), _launcher_groups(d))
        logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted((d / "logs").glob("*.log"))) if (d / "logs").is_dir() else ""
        bring_down(d)
        failure = f"up.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}{logs}"
        if "Address already in use" not in failure:
            break
    pytest.fail(failure)


def _launcher_groups(directory: Path) -> list[int]:
    """Process groups (= launcher pids: each server runs in its own session) recorded in ``directory/run``."""
    groups = []
    for pid_file in sorted((directory / "run").glob("*.pid")):
        text = pid_file.read_text().strip()
        if text.isdigit():
            groups.append(int(text))
    return groups


def bring_down(directory: Path, groups: Sequence[int] = ()) -> None:
    """down.sh DIR; then SIGKILL any of ``groups`` still running our launcher (down.sh found
    nothing to stop, e.g. because DIR was removed under us)."""
    if (directory / "run").is_dir():
        subprocess.run(["bash", str(INTEROP_DIR / "down.sh"), str(directory)],
                       capture_output=True, timeout=120, check=False)
    for pgid in groups:
        try:
            cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
        except OSError:
            continue  # gone
        if b"instance.py\0serve\0" in cmdline:  # still a launcher up.sh started for us, never anything else
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


# -- helpers shared by the test modules ------------------------------------------------------------


@dataclass
class Ran:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"$ {shlex.join(self.argv)}\nexit {self.returncode}\n--- stdout ---\n{self.stdout[-6000:]}"
                f"\n--- stderr ---\n{self.stderr[-4000:]}")


async def run_tool(argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None,
                   check: bool = True, timeout: float = 90.0) -> Ran:
    """Run an upstream command line tool while the trio loop keeps serving our actors."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        proc = await trio.run_process(list(argv), env=dict(env), cwd=cwd, capture_stdout=True,
                                      capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    ran = Ran(list(argv), proc.returncode, proc.stdout.decode(errors="replace"),
              proc.stderr.decode(errors="replace"))
    shown = [Path(argv[1]).name, *argv[2:4]] if len(argv) > 1 else list(argv)
    print(f"[interop] {trio.current_time() - started:5.1f}s {shlex.join(shown)}")  # shown on failure
    if check and ran.returncode != 0:
        raise AssertionError(f"command failed:\n{ran.describe()}")
    return ran


async def run_tools(*calls: tuple[Sequence[str], Mapping[str, str]], check: bool = True) -> list[Ran]:
    """Several upstream commands at once (each spends seconds importing keylime), in order."""
    results: list[Ran | None] = [None] * len(calls)

    async def one(i: int, argv: Sequence[str], env: Mapping[str, str]) -> None:
        results[i] = await run_tool(argv, env, check=check)

    async with trio.open_nursery() as nursery:
        for i, (argv, env) in enumerate(calls):
            nursery.start_soon(one, i, argv, env)
    return [r for r in results if r is not None]


@asynccontextmanager
async def running_machine(name: str, root: Path, ca: CaFiles, **options: Any) -> AsyncIterator[Machine]:
    """A testbed machine (swtpm, boot, IMA log, our agent) for the duration of the block."""
    async with trio.open_nursery() as nursery:
        machine = Machine(name, root, ca, **options)
        await nursery.start(machine.run)
        try:
            yield machine
        finally:
            nursery.cancel_scope.cancel()


def server_client(ca: CaFiles) -> Any:
    """An httpx client with the server-components client cert (mTLS to verifier/registrar)."""
    return http.make_client(tls.client_context([ca.ca], ca.client_cert, ca.client_key), timeout=20.0)


async def agent_record(client: Any, verifier_url: str, agent_id: str, version: str = "2.1") -> dict[str, Any]:
    reply = await http.request_json(client, "GET", f"{verifier_url}/v{version}/agents/{agent_id}")
    return reply.results


async def wait_record(client: Any, verifier_url: str, agent_id: str, pred: Any, *,
                      timeout: float, what: str) -> dict[str, Any]:
    """Poll the verifier's record until ``pred(record)``; fail naming the last record seen."""
    last: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            last = await agent_record(client, verifier_url, agent_id)
            if pred(last):
                return last
            await trio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last record: {last}")


CA_PASSWORD = "keytrio-interop"  # upstream's --cert keystore password (its CLI refuses "default")


def cert_payload_setup(upstream: Upstream, root: Path, machine: Machine) -> tuple[dict[str, str], Path, Path, Path, Path]:
    """What ``keylime_tenant -c add --cert CERT_DIR --include INCL`` needs, plus observers:
    -> (extra env: a ca.conf with a real keystore password; CERT_DIR (absent: upstream's ca_util
    creates its CA, the agent's cert and the RevocationNotifier pair there); INCL (an autorun.sh
    that lists the unpacked payload into the returned marker); the file our agent's revocation
    action writes each notice's msg to)."""
    ca_conf = root / "ca.conf"
    ca_conf.write_text(Path(upstream.env["KEYLIME_CA_CONFIG"]).read_text().replace(
        "password = default", f"password = {CA_PASSWORD}"))
    incl = root / "include"
    incl.mkdir()
    marker = root / "autorun-ran"
    (incl / "autorun.sh").write_text(f"#!/bin/sh\nls > '{marker}'\n")
    notice_out = root / "notice.json"
    action = machine.actions_dir / "50-record-notice"
    action.write_text(f"#!/bin/sh\ncat > '{notice_out}.tmp' && mv '{notice_out}.tmp' '{notice_out}'\n")
    action.chmod(0o755)
    return {"KEYLIME_CA_CONFIG": str(ca_conf)}, root / "tenant-ca", incl, marker, notice_out


async def wait_file(path: Path, timeout: float) -> bytes:
    with trio.move_on_after(timeout):
        while not path.exists():
            await trio.sleep(0.2)
        return path.read_bytes()
    raise AssertionError(f"{path} did not appear within {timeout}s")


@contextlib.contextmanager
def upstream_instance(extra_env: Mapping[str, str] | None = None, *,
                      prefix: str = "keytrio-keylime-") -> Iterator[Upstream]:
    """One more upstream instance (its own up.sh DIR, ports and database) for a module whose
    upstream needs another configuration than the session's, e.g. ``KEYLIME_VERIFIER_*`` options;
    down.sh and the directory's removal when the block ends. Fails (never skips) like the
    session fixture when up.sh cannot run."""
    require_tools()
    # not under pytest's basetemp (see conftest.upstream)
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    up: Upstream | None = None
    try:
        up = bring_up(directory, extra_env)
        yield up
    finally:
        if up is not None:
            bring_down(up.dir, up.groups)
        shutil.rmtree(directory, ignore_errors=True)


async def restart_server(up: Upstream, server: str, *, timeout: float = 180.0) -> None:
    """Stop one upstream server and start it again with the environment ``up.sh`` gave it
    (``instance.py restart DIR server``, run by the venv's python); fails with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    argv = [str((up.dir / "venv").resolve() / "bin" / "python"), str(INTEROP_DIR / "instance.py"), "restart",
            str(up.dir), server]
    with trio.fail_after(timeout):
        proc = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True, check=False,
                                      stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"restart of the upstream {server} failed (exit {proc.returncode}):\n"
                    f"{proc.stderr.decode(errors='replace')[-4000:]}")
    up.groups = _launcher_groups(up.dir)
