"""swtpm instances for the testbed: provisioning (EK + EK certs from a private local CA) and lifecycle.

Layout of a state directory ``D`` (everything stays under ``D``; nothing in /etc or /var/lib):

    D/keytrio-swtpm.json   banks + where the local CA lives (written last: marks "provisioned")
    D/tpm/                 swtpm's TPM state (tpm2-00.permall)
    D/localca/             the private swtpm-localca CA (unless ``ca_dir`` points elsewhere)
    D/ek-certs/            copies of the EK certificates (DER) written by swtpm_setup
    D/swtpm_setup.conf     private swtpm_setup configuration
    D/setup.log, D/swtpm.log
    D/swtpm.sock, D/swtpm.sock.ctrl   unix transport (or a short /tmp dir when D's path is too long)

TCTI strings that work with Debian's libtss2 3.2.1 (tpm2-pytss ``ESAPI(tcti)`` and tpm2-tools
``TPM2TOOLS_TCTI``): ``swtpm:path=<D>/swtpm.sock`` (control socket is ``<path>.ctrl``) and
``swtpm:host=127.0.0.1,port=P`` (control port is P+1).

swtpm serves one client connection at a time: while one ESAPI context is connected, another client
(tpm2-tools, a second ESAPI) blocks until the first disconnects.
"""

from __future__ import annotations

import contextlib
import errno
import json
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

from keytrio.actors.common.private_files import private_dir

DEFAULT_BANKS: tuple[str, ...] = ("sha1", "sha256", "sha384")
KNOWN_BANKS = ("sha1", "sha256", "sha384", "sha512")

_META = "keytrio-swtpm.json"
_RUN_INFO = "swtpm.run.json"
_PID_FILE = "swtpm.pid"
# sun_path is 108 bytes; keep a margin for the ".ctrl" suffix.
_MAX_UNIX_PATH = 100

# Raw TPM2_Shutdown(TPM_SU_CLEAR): tag NO_SESSIONS, size 12, CC 0x145, shutdownType 0.
_TPM2_SHUTDOWN_CLEAR = bytes.fromhex("80010000000c000001450000")
# swtpm control channel: CMD_GET_CAPABILITY (1) answers 4-byte result + 4-byte capabilities.
_CTRL_GET_CAPABILITY = struct.pack(">I", 1)


class SwtpmError(RuntimeError):
    """swtpm could not be provisioned, started or stopped."""


# ----------------------------------------------------------------------------------------------
# Provisioning (sync: called from a thread by the async API, or directly by CLI code)
# ----------------------------------------------------------------------------------------------


def is_provisioned(state_dir: Path) -> bool:
    state_dir = Path(state_dir)
    return (state_dir / _META).is_file() and (state_dir / "tpm" / "tpm2-00.permall").is_file()


def _check_banks(banks: Sequence[str]) -> tuple[str, ...]:
    out = tuple(b.lower() for b in banks)
    if not out or any(b not in KNOWN_BANKS for b in out):
        raise SwtpmError(f"unsupported PCR banks {banks!r}; choose from {KNOWN_BANKS}")
    return out


def init_local_ca(ca_dir: Path) -> Path:
    """Write the private swtpm-localca configuration into ``ca_dir``; return the .conf path.

    The CA key and certificates are created by swtpm_localca on first use (lazily, under its lock),
    so several TPMs provisioned against one ``ca_dir`` share one CA.
    """
    ca_dir = Path(ca_dir).resolve()
    private_dir(ca_dir)  # swtpm_localca writes the EK CA's signing key here
    conf = ca_dir / "swtpm-localca.conf"
    if not conf.exists():
        conf.write_text(
            f"statedir = {ca_dir}\n"
            f"signingkey = {ca_dir / 'signkey.pem'}\n"
            f"issuercert = {ca_dir / 'issuercert.pem'}\n"
            f"certserial = {ca_dir / 'certserial'}\n"
        )
    opts = ca_dir / "swtpm-localca.options"
    if not opts.exists():
        opts.write_text("--platform-manufacturer keytrio\n--platform-version 2.1\n--platform-model swtpm\n")
    return conf


def provision(
    state_dir: Path,
    *,
    banks: Sequence[str] = DEFAULT_BANKS,
    ca_dir: Path | None = None,
    platform_cert: bool = True,
) -> None:
    """Manufacture a TPM 2.0 state in ``state_dir`` (idempotent: does nothing if already provisioned).

    Creates the RSA-2048 EK (persistent 0x81010001, cert at NV 0x01c00002) and the ECC P-384 EK
    (persistent 0x81010016, cert at NV 0x01c00016), certificates signed by a private local CA in
    ``ca_dir`` (default ``state_dir/localca``), and activates exactly ``banks``.
    """
    state_dir = Path(state_dir).resolve()
    banks = _check_banks(banks)
    if is_provisioned(state_dir):
        return
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm") is None:
        raise SwtpmError("swtpm / swtpm_setup not found (apt-get install swtpm swtpm-tools)")
    ca_dir = Path(ca_dir).resolve() if ca_dir is not None else state_dir / "localca"
    tpm_dir = state_dir / "tpm"
    certs_dir = state_dir / "ek-certs"
    certs_dir.mkdir(parents=True, exist_ok=True)
    private_dir(tpm_dir)  # the TPM's seeds and keys
    ca_conf = init_local_ca(ca_dir)
    setup_conf = state_dir / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca') or '/usr/bin/swtpm_localca'}\n"
        f"create_certs_tool_config = {ca_conf}\n"
        f"create_certs_tool_options = {ca_dir / 'swtpm-localca.options'}\n"
        f"active_pcr_banks = {','.join(banks)}\n"
    )
    log = state_dir / "setup.log"
    cmd = [
        "swtpm_setup", "--tpm2", "--tpmstate", str(tpm_dir),
        "--pcr-banks", ",".join(banks),
        "--create-ek-cert",
        "--config", str(setup_conf),
        "--write-ek-cert-files", str(certs_dir),
        "--logfile", str(log),
        "--overwrite",
    ]  # fmt: skip
    if platform_cert:
        cmd.insert(cmd.index("--create-ek-cert") + 1, "--create-platform-cert")
    # XDG_CONFIG_HOME: keep swtpm_setup from looking at the user's ~/.config defaults.
    env = {**os.environ, "XDG_CONFIG_HOME": str(state_dir)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise SwtpmError(f"swtpm_setup failed ({res.returncode}): {res.stderr.strip()}\n{tail}")
    for key in ca_dir.glob("*key*.pem"):  # swtpm_localca makes its CA keys 0640
        key.chmod(0o600)
    meta = {
        "banks": list(banks),
        # relative when inside the state dir, so a copied state dir stays self-contained
        "ca_dir": _rel_or_abs(ca_dir, state_dir),
    }
    tmp = state_dir / (_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(state_dir / _META)


def _rel_or_abs(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _meta(state_dir: Path) -> dict:
    state_dir = Path(state_dir)
    try:
        return json.loads((state_dir / _META).read_text())
    except FileNotFoundError:
        raise SwtpmError(f"{state_dir} is not a provisioned swtpm state dir") from None


def state_banks(state_dir: Path) -> tuple[str, ...]:
    """The PCR banks a provisioned state was manufactured with."""
    return tuple(_meta(state_dir)["banks"])


def ca_dir_of(state_dir: Path) -> Path:
    state_dir = Path(state_dir).resolve()
    return (state_dir / _meta(state_dir)["ca_dir"]).resolve()


def local_ca_certs(ca_dir: Path) -> list[Path]:
    """PEM files of an swtpm-localca's chain that exist: [issuer (intermediate) cert, root CA cert]."""
    out = [Path(ca_dir) / "issuercert.pem", Path(ca_dir) / "swtpm-localca-rootca-cert.pem"]
    return [p for p in out if p.is_file()]


def ek_ca_certs(state_dir: Path) -> list[Path]:
    """PEM files of the EK certificates' issuer chain: [local CA issuer cert, local root CA cert]."""
    return local_ca_certs(ca_dir_of(state_dir))


def ek_cert_files(state_dir: Path) -> dict[str, Path]:
    """DER copies of the EK certs that swtpm_setup wrote: keys ``rsa2048`` and ``ecc384``."""
    d = Path(state_dir) / "ek-certs"
    out = {}
    for key, name in (("rsa2048", "ek-rsa2048.crt"), ("ecc384", "ek-secp384r1.crt")):
        if (d / name).is_file():
            out[key] = d / name
    return out


def copy_state(src: Path, dst: Path) -> None:
    """Copy a provisioned (not running) state dir: a clone with the SAME EKs, for fast tests."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not is_provisioned(src):
        raise SwtpmError(f"{src} is not provisioned")
    transient = {"swtpm.log", _PID_FILE, _RUN_INFO, "swtpm.sock", "swtpm.sock.ctrl", ".lock"}
    # A CA inside src is copied along (its path is stored relative); an outside CA is shared.
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in transient])


# ----------------------------------------------------------------------------------------------
# Talking to swtpm without a TSS: control-channel probe and raw TPM2_Shutdown
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
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
    def from_json(cls, d: dict) -> _Endpoint:
        return cls(d["transport"], d.get("path"), d.get("port"), d.get("host", "127.0.0.1"))


async def _recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise SwtpmError("swtpm closed the connection")
        buf += chunk
    return buf


async def _probe(ep: _Endpoint) -> bool:
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


async def _send_shutdown_clear(ep: _Endpoint, timeout: float = 5.0) -> int | None:
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


def _unix_endpoint(state_dir: Path) -> tuple[_Endpoint, Path | None]:
    """Socket in the state dir, or in a short private /tmp dir when the path would be too long."""
    sock = state_dir / "swtpm.sock"
    if len(str(sock)) + len(".ctrl") < _MAX_UNIX_PATH:
        return _Endpoint("unix", path=str(sock)), None
    short = Path(tempfile.mkdtemp(prefix="swtpm-", dir="/tmp"))
    return _Endpoint("unix", path=str(short / "s")), short


def _bind_tcp_pair(host: str = "127.0.0.1", attempts: int = 50) -> tuple[int, socket.socket]:
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


def _swtpm_argv(
    state_dir: Path, ep: _Endpoint, ctrl_fd: int | None, *, daemon: bool, log_path: Path
) -> list[str]:
    argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir / 'tpm'}"]
    if ep.transport == "unix":
        argv += ["--server", f"type=unixio,path={ep.path}", "--ctrl", f"type=unixio,path={ep.path}.ctrl"]
    else:
        assert ctrl_fd is not None
        argv += ["--server", f"type=tcp,port={ep.port},bindaddr={ep.host}", "--ctrl", f"type=tcp,fd={ctrl_fd}"]
    argv += ["--flags", "not-need-init,startup-clear", "--log", f"file={log_path}"]
    if daemon:
        argv += ["--daemon", "--pid", f"file={state_dir / _PID_FILE}"]
    return argv


async def _wait_ready(ep: _Endpoint, proc: trio.Process | None, log_path: Path, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        delay = 0.005
        while True:
            if proc is not None and proc.returncode is not None:
                raise SwtpmError(f"swtpm exited with {proc.returncode}: {_tail(log_path)}")
            if await _probe(ep):
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
    raise SwtpmError(f"swtpm did not answer within {timeout}s: {_tail(log_path)}")


def _tail(path: Path, n: int = 1500) -> str:
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
    _endpoint: _Endpoint | None = None
    _process: trio.Process | None = None
    _short_dir: Path | None = None
    _unix_ep: _Endpoint | None = None
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
                self._unix_ep, self._short_dir = _unix_endpoint(self.state_dir)
            self._endpoint = self._unix_ep
            for suffix in ("", ".ctrl"):  # stale sockets from a killed run
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._endpoint.path + suffix)
        else:
            if self._ctrl_socket is None:  # kept open: the same ports across restarts
                self._restartable_port, self._ctrl_socket = _bind_tcp_pair()
            self._endpoint = _Endpoint("tcp", port=self._restartable_port)
            ctrl_fd = self._ctrl_socket.fileno()
        argv = _swtpm_argv(self.state_dir, self._endpoint, ctrl_fd, daemon=False, log_path=self.log_path)
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
            await _wait_ready(self._endpoint, self._process, self.log_path)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._terminate()
            raise

    async def shutdown_clear(self, timeout: float = 5.0) -> bool:
        """Send TPM2_Shutdown(CLEAR) (needs no other client connected). True if the TPM accepted it."""
        if self._endpoint is None:
            return False
        return await _send_shutdown_clear(self._endpoint, timeout) == 0

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


# ----------------------------------------------------------------------------------------------
# Detached (daemonized) swtpm for the CLI: `keytrio testbed tpm start|stop --dir D`
# ----------------------------------------------------------------------------------------------


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
    info_path = state_dir / _RUN_INFO
    if info_path.exists():
        info = json.loads(info_path.read_text())
        ep = _Endpoint.from_json(info["endpoint"])
        if _pid_alive(_read_pid(state_dir)) and await _probe(ep):
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


async def _start_daemon_once(state_dir: Path, transport: str, log_path: Path) -> tuple[_Endpoint, Path | None]:
    short: Path | None = None
    ctrl: socket.socket | None = None
    if transport == "unix":
        ep, short = _unix_endpoint(state_dir)
        for suffix in ("", ".ctrl"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path + suffix)
    else:
        port, ctrl = _bind_tcp_pair()
        ep = _Endpoint("tcp", port=port)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / _PID_FILE).unlink()
    ctrl_fd = ctrl.fileno() if ctrl is not None else None
    argv = _swtpm_argv(state_dir, ep, ctrl_fd, daemon=True, log_path=log_path)
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
            raise SwtpmError(f"swtpm --daemon failed ({res.returncode}): {_tail(log_path)}")
        await _wait_ready(ep, None, log_path)
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
        return int((Path(state_dir) / _PID_FILE).read_text().strip())
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
    for name in (_RUN_INFO, _PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / name).unlink()


def detached_tcti(state_dir: Path) -> str | None:
    """TCTI of a detached swtpm started on ``state_dir`` (None if none was started)."""
    try:
        info = json.loads((Path(state_dir) / _RUN_INFO).read_text())
    except FileNotFoundError:
        return None
    return _Endpoint.from_json(info["endpoint"]).tcti


async def stop_detached(state_dir: Path, *, timeout: float = 5.0) -> bool:
    """Shutdown(CLEAR) and stop a swtpm started by :func:`start_detached`. False if none was running."""
    state_dir = Path(state_dir).resolve()
    try:
        info = json.loads((state_dir / _RUN_INFO).read_text())
    except FileNotFoundError:
        info = {}
    pid = _read_pid(state_dir)
    if not _pid_alive(pid):
        _cleanup_run_info(state_dir, info)
        return False
    assert pid is not None
    if info:
        await _send_shutdown_clear(_Endpoint.from_json(info["endpoint"]), timeout)
    os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(timeout):
        while _pid_alive(pid):
            await trio.sleep(0.02)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    _cleanup_run_info(state_dir, info)
    return True
