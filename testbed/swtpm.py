"""Running swtpm on a provisioned state (:mod:`testbed.swtpm_state`): :func:`swtpm_running` starts
it as a child process, stops it cleanly (TPM2_Shutdown(CLEAR), then SIGTERM) and restarts it as a
reboot; the helpers that talk to swtpm without a TSS (control-channel probe, raw Shutdown) and
launch it serve the detached daemon of the CLI too (:mod:`testbed.swtpm_detached`).

TCTI strings that work with Debian's libtss2 3.2.1 (tpm2-pytss ``ESAPI(tcti)`` and tpm2-tools
``TPM2TOOLS_TCTI``): ``swtpm:path=<D>/swtpm.sock`` (control socket is ``<path>.ctrl``) and
``swtpm:host=127.0.0.1,port=P`` (control port is P+1).

swtpm serves one client connection at a time: while one ESAPI context is connected, another client
(tpm2-tools, a second ESAPI) blocks until the first disconnects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from keytrio.testbed.swtpm_state import DEFAULT_BANKS, PID_FILE, SwtpmError, provision, state_banks

# sun_path is 108 bytes; keep a margin for the ".ctrl" suffix.
_MAX_UNIX_PATH = 100

# Raw TPM2_Shutdown(TPM_SU_CLEAR): tag NO_SESSIONS, size 12, CC 0x145, shutdownType 0.
_TPM2_SHUTDOWN_CLEAR = bytes.fromhex("80010000000c000001450000")
# swtpm control channel: CMD_GET_CAPABILITY (1) answers 4-byte result + 4-byte capabilities.
_CTRL_GET_CAPABILITY = struct.pack(">I", 1)


# ----------------------------------------------------------------------------------------------
# Talking to swtpm without a TSS: control-channel probe and raw TPM2_Shutdown
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where swtpm listens: unix socket paths, or a TCP port pair."""

    transport: str
    path: str | None = None  # unix data socket (control socket = path + ".ctrl")
    port: int | None = None  # tcp data port (control port = port + 1)
    host: str = "127.0.0.1"

    @property
    def tcti(self) -> str:
        if self.transport == "unix":
            return f"swtpm:path={self.path}"
        return f"swtpm:host={self.host},port={self.port}"

    async def connect(self, ctrl: bool) -> trio.SocketStream:
        if self.transport == "unix":
            return await trio.open_unix_socket(self.path + ".ctrl" if ctrl else self.path)
        assert self.port is not None
        return await trio.open_tcp_stream(self.host, self.port + 1 if ctrl else self.port)

    def to_json(self) -> dict:
        return {"transport": self.transport, "path": self.path, "port": self.port, "host": self.host}

    @classmethod
    def from_json(cls, d: dict) -> Endpoint:
        return cls(d["transport"], d.get("path"), d.get("port"), d.get("host", "127.0.0.1"))


async def _recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise SwtpmError("swtpm closed the connection")
        buf += chunk
    return buf


async def probe(ep: Endpoint) -> bool:
    """True when swtpm answers on its control channel."""
    try:
        stream = await ep.connect(ctrl=True)
    except OSError:
        return False
    async with stream:
        try:
            await stream.send_all(_CTRL_GET_CAPABILITY)
            resp = await _recv_exactly(stream, 8)
        except (OSError, trio.BrokenResourceError, SwtpmError):
            return False
    return struct.unpack(">I", resp[:4])[0] == 0


async def send_shutdown_clear(ep: Endpoint, timeout: float = 5.0) -> int | None:
    """Send TPM2_Shutdown(CLEAR) on the data channel; return the TPM response code (None: no answer).

    Done with raw bytes so stopping needs no TSS and no thread. Blocks while another client holds
    swtpm's single data connection, hence the timeout.
    """
    with trio.move_on_after(timeout):
        try:
            stream = await ep.connect(ctrl=False)
        except OSError:
            return None
        async with stream:
            try:
                await stream.send_all(_TPM2_SHUTDOWN_CLEAR)
                hdr = await _recv_exactly(stream, 10)
            except (OSError, trio.BrokenResourceError, SwtpmError):
                return None
        return struct.unpack(">I", hdr[6:10])[0]
    return None


# ----------------------------------------------------------------------------------------------
# Starting swtpm
# ----------------------------------------------------------------------------------------------


def unix_endpoint(state_dir: Path) -> tuple[Endpoint, Path | None]:
    """Socket in the state dir, or in a short private /tmp dir when the path would be too long."""
    sock = state_dir / "swtpm.sock"
    if len(str(sock)) + len(".ctrl") < _MAX_UNIX_PATH:
        return Endpoint("unix", path=str(sock)), None
    short = Path(tempfile.mkdtemp(prefix="swtpm-", dir="/tmp"))
    return Endpoint("unix", path=str(short / "s")), short


def bind_tcp_pair(host: str = "127.0.0.1", attempts: int = 50) -> tuple[int, socket.socket]:
    """Choose consecutive ports P, P+1 (the swtpm TCTI requires ctrl = data + 1).

    The control socket is bound and listening here and handed to swtpm as a file descriptor. The
    data port can't be passed that way (swtpm treats a data ``fd=`` as an accepted connection), so
    it is released and passed by number: a small race, which the caller covers by retrying.
    """
    for _ in range(attempts):
        data = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        data.bind((host, 0))
        port = data.getsockname()[1]
        if port >= 65535:
            data.close()
            continue
        ctrl = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            ctrl.bind((host, port + 1))
        except OSError as e:
            ctrl.close()
            if e.errno == errno.EADDRINUSE:
                continue
            raise
        finally:
            data.close()
        ctrl.listen(8)
        return port, ctrl
    raise SwtpmError("could not find two consecutive free TCP ports")


def swtpm_argv(
    state_dir: Path, ep: Endpoint, ctrl_fd: int | None, *, daemon: bool, log_path: Path
) -> list[str]:
    argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir / 'tpm'}"]
    if ep.transport == "unix":
        argv += ["--server", f"type=unixio,path={ep.path}", "--ctrl", f"type=unixio,path={ep.path}.ctrl"]
    else:
        assert ctrl_fd is not None
        argv += ["--server", f"type=tcp,port={ep.port},bindaddr={ep.host}", "--ctrl", f"type=tcp,fd={ctrl_fd}"]
    argv += ["--flags", "not-need-init,startup-clear", "--log", f"file={log_path}"]
    if daemon:
        argv += ["--daemon", "--pid", f"file={state_dir / PID_FILE}"]
    return argv


async def wait_ready(ep: Endpoint, proc: trio.Process | None, log_path: Path, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        delay = 0.005
        while True:
            if proc is not None and proc.returncode is not None:
                raise SwtpmError(f"swtpm exited with {proc.returncode}: {tail(log_path)}")
            if await probe(ep):
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
    raise SwtpmError(f"swtpm did not answer within {timeout}s: {tail(log_path)}")


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Swtpm:
    """A running swtpm child process (made by :func:`swtpm_running`)."""

    state_dir: Path
    banks: tuple[str, ...]
    transport: str
    log_path: Path
    _endpoint: Endpoint | None = None
    _process: trio.Process | None = None
    _short_dir: Path | None = None
    _unix_ep: Endpoint | None = None
    _ctrl_socket: socket.socket | None = field(default=None, repr=False)
    _restartable_port: int | None = None

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-pytss (``ESAPI(tcti)``) and tpm2-tools (``TPM2TOOLS_TCTI``)."""
        if self._endpoint is None:
            raise SwtpmError("swtpm is not running")
        return self._endpoint.tcti

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _start(self) -> None:
        if self.transport not in ("unix", "tcp"):
            raise SwtpmError(f"unknown transport {self.transport!r}")
        attempts = 5 if self.transport == "tcp" else 1
        first_start = self._ctrl_socket is None
        for attempt in range(attempts):
            try:
                await self._start_once()
                return
            except SwtpmError:
                # tcp: the data port may have been taken between choosing and binding it;
                # on a first start choose new ports, on a restart keep them (the TCTI must not change)
                if attempt == attempts - 1:
                    raise
                if first_start:
                    self._close_sockets()
                await trio.sleep(0.05)

    async def _start_once(self) -> None:
        ctrl_fd = None
        if self.transport == "unix":
            if self._unix_ep is None:  # kept: the same socket path across restarts
                self._unix_ep, self._short_dir = unix_endpoint(self.state_dir)
            self._endpoint = self._unix_ep
            for suffix in ("", ".ctrl"):  # stale sockets from a killed run
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._endpoint.path + suffix)
        else:
            if self._ctrl_socket is None:  # kept open: the same ports across restarts
                self._restartable_port, self._ctrl_socket = bind_tcp_pair()
            self._endpoint = Endpoint("tcp", port=self._restartable_port)
            ctrl_fd = self._ctrl_socket.fileno()
        argv = swtpm_argv(self.state_dir, self._endpoint, ctrl_fd, daemon=False, log_path=self.log_path)
        # swtpm writes a line per client disconnect: never a pipe, always a file.
        with open(self.log_path, "ab") as out:
            self._process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(ctrl_fd,) if ctrl_fd is not None else (),
            )
        try:
            await wait_ready(self._endpoint, self._process, self.log_path)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._terminate()
            raise

    async def shutdown_clear(self, timeout: float = 5.0) -> bool:
        """Send TPM2_Shutdown(CLEAR) (needs no other client connected). True if the TPM accepted it."""
        if self._endpoint is None:
            return False
        return await send_shutdown_clear(self._endpoint, timeout) == 0

    async def _terminate(self) -> None:
        proc = self._process
        if proc is not None:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            self._process = None

    async def stop(self) -> None:
        """Orderly stop: TPM2_Shutdown(CLEAR), then SIGTERM and wait."""
        with trio.CancelScope(shield=True):
            if self._process is not None and self._process.returncode is None:
                await self.shutdown_clear()
            await self._terminate()
            self._endpoint = None

    async def restart(self) -> None:
        """A reboot: Shutdown(CLEAR), stop, start on the same state (PCRs reset, resetCount + 1).

        The TCTI string stays the same (same socket path / same TCP ports).
        """
        await self.stop()
        await self._start()

    def _release(self) -> None:
        """After the final stop: free the control socket and any short socket dir."""
        self._close_sockets()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
        self._short_dir = None
        self._unix_ep = None

    def _close_sockets(self) -> None:
        if self._ctrl_socket is not None:
            self._ctrl_socket.close()
        self._ctrl_socket = None
        self._restartable_port = None


@contextlib.asynccontextmanager
async def swtpm_running(
    state_dir: Path,
    *,
    banks: Sequence[str] = DEFAULT_BANKS,
    transport: str = "unix",
    ca_dir: Path | None = None,
) -> AsyncIterator[Swtpm]:
    """Provision ``state_dir`` if needed, run swtpm on it, and stop it cleanly on exit.

    ``banks`` only matters when provisioning; an existing state keeps its own banks.
    """
    state_dir = Path(state_dir).resolve()
    await trio.to_thread.run_sync(lambda: provision(state_dir, banks=banks, ca_dir=ca_dir))
    inst = Swtpm(state_dir, state_banks(state_dir), transport, state_dir / "swtpm.log")
    try:
        await inst._start()
        yield inst
    finally:
        await inst.stop()
        inst._release()

