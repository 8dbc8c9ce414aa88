"""A detached (daemonized) swtpm for the CLI: ``keytrio testbed tpm start|stop --dir D``.

The daemon outlives the command that started it: its endpoint is kept in ``D/swtpm.run.json`` and
its pid in ``D/swtpm.pid``, so a later command finds (:func:`detached_tcti`) or stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

from keytrio.testbed.swtpm import (
    Endpoint,
    bind_tcp_pair,
    probe,
    send_shutdown_clear,
    swtpm_argv,
    tail,
    unix_endpoint,
    wait_ready,
)
from keytrio.testbed.swtpm_state import DEFAULT_BANKS, PID_FILE, RUN_INFO, SwtpmError, provision


async def start_detached(
    state_dir: Path,
    *,
    banks: Sequence[str] = DEFAULT_BANKS,
    transport: str = "unix",
    ca_dir: Path | None = None,
) -> str:
    """Provision if needed, start swtpm as a daemon (pid file in ``state_dir``); return its TCTI."""
    state_dir = Path(state_dir).resolve()
    await trio.to_thread.run_sync(lambda: provision(state_dir, banks=banks, ca_dir=ca_dir))
    info_path = state_dir / RUN_INFO
    if info_path.exists():
        info = json.loads(info_path.read_text())
        ep = Endpoint.from_json(info["endpoint"])
        if _pid_alive(_read_pid(state_dir)) and await probe(ep):
            return ep.tcti  # already running
        _cleanup_run_info(state_dir, info)
    log_path = state_dir / "swtpm.log"
    if transport not in ("unix", "tcp"):
        raise SwtpmError(f"unknown transport {transport!r}")
    attempts = 5 if transport == "tcp" else 1
    for attempt in range(attempts):
        try:
            ep, short = await _start_daemon_once(state_dir, transport, log_path)
            break
        except SwtpmError:
            if attempt == attempts - 1:
                raise
            await trio.sleep(0.05)
    info = {"endpoint": ep.to_json(), "short_dir": str(short) if short else None}
    info_path.write_text(json.dumps(info))
    return ep.tcti


async def _start_daemon_once(state_dir: Path, transport: str, log_path: Path) -> tuple[Endpoint, Path | None]:
    short: Path | None = None
    ctrl: socket.socket | None = None
    if transport == "unix":
        ep, short = unix_endpoint(state_dir)
        for suffix in ("", ".ctrl"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path + suffix)
    else:
        port, ctrl = bind_tcp_pair()
        ep = Endpoint("tcp", port=port)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / PID_FILE).unlink()
    ctrl_fd = ctrl.fileno() if ctrl is not None else None
    argv = swtpm_argv(state_dir, ep, ctrl_fd, daemon=True, log_path=log_path)
    try:
        with open(log_path, "ab") as out:
            res = await trio.run_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(ctrl_fd,) if ctrl_fd is not None else (),
                check=False,
            )
    finally:
        if ctrl is not None:  # the daemon holds its own copy now
            ctrl.close()
    try:
        if res.returncode != 0:
            raise SwtpmError(f"swtpm --daemon failed ({res.returncode}): {tail(log_path)}")
        await wait_ready(ep, None, log_path)
    except BaseException:
        pid = _read_pid(state_dir)
        if _pid_alive(pid):
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)
        raise
    return ep, short


def _read_pid(state_dir: Path) -> int | None:
    try:
        return int((Path(state_dir) / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A daemonized swtpm is re-parented to PID 1, which may reap it late: a zombie has exited.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cleanup_run_info(state_dir: Path, info: dict) -> None:
    if info.get("short_dir"):
        shutil.rmtree(info["short_dir"], ignore_errors=True)
    for name in (RUN_INFO, PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / name).unlink()


def detached_tcti(state_dir: Path) -> str | None:
    """TCTI of a detached swtpm started on ``state_dir`` (None if none was started)."""
    try:
        info = json.loads((Path(state_dir) / RUN_INFO).read_text())
    except FileNotFoundError:
        return None
    return Endpoint.from_json(info["endpoint"]).tcti


async def stop_detached(state_dir: Path, *, timeout: float = 5.0) -> bool:
    """Shutdown(CLEAR) and stop a swtpm started by :func:`start_detached`. False if none was running."""
    state_dir = Path(state_dir).resolve()
    try:
        info = json.loads((state_dir / RUN_INFO).read_text())
    except FileNotFoundError:
        info = {}
    pid = _read_pid(state_dir)
    if not _pid_alive(pid):
        _cleanup_run_info(state_dir, info)
        return False
    assert pid is not None
    if info:
        await send_shutdown_clear(Endpoint.from_json(info["endpoint"]), timeout)
    os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(timeout):
        while _pid_alive(pid):
            await trio.sleep(0.02)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    _cleanup_run_info(state_dir, info)
    return True
