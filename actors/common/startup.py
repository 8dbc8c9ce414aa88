"""Start-up failures of the services: one line naming the thing and the fix, one exit code each.

An actor's ``run`` raises :class:`StartupError` for anything an operator must act on before
``task_status.started``: a port in use, a TLS file missing or unreadable, the TPM or the database
out of reach, the data directory held by another instance. The command line prints it as one line
(``keytrio verifier: <what> -- <fix>``) and exits with its code; the systemd units list the codes
a restart cannot help in ``RestartPreventExitStatus=`` (:data:`NO_RESTART`).

The order of a start is what keeps a failure from leaving anything half done: lock the data
directory, load the TLS files, bind every listening socket, and only then open (and migrate) the
database and touch the TPM.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import gc
import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Exit(enum.IntEnum):
    """Exit codes of ``keytrio registrar|verifier|agent`` (README "Exit codes")."""

    OK = 0
    INTERNAL = 1  # an unexpected error (a bug): the traceback is printed
    CONFIG = 2  # bad command line or configuration file (argparse uses 2 as well)
    PORT_IN_USE = 10  # a listening port is taken by another process
    BIND = 11  # the address cannot be bound (not on this host yet, or a privileged port)
    TLS = 12  # a TLS file is missing, unreadable or invalid
    TPM = 13  # the TPM (tcti) cannot be opened
    DATABASE = 14  # the database cannot be reached
    SCHEMA = 15  # the database schema is older than this version and auto_migrate_db = false
    DATADIR_LOCKED = 16  # another instance runs on the same data directory
    DATADIR = 17  # the data directory cannot be created or written
    REGISTRATION = 18  # the agent could not register with the registrar


#: the codes a restart cannot help: an operator must change something first
NO_RESTART: tuple[Exit, ...] = (
    Exit.CONFIG, Exit.PORT_IN_USE, Exit.TLS, Exit.TPM, Exit.SCHEMA, Exit.DATADIR_LOCKED, Exit.DATADIR,
)

#: one line per code for --help epilogs and the docs
MEANINGS: dict[Exit, str] = {
    Exit.OK: "clean shutdown (SIGTERM/SIGINT)",
    Exit.INTERNAL: "unexpected error (a bug; traceback on stderr)",
    Exit.CONFIG: "invalid command line or configuration",
    Exit.PORT_IN_USE: "a listening port is in use",
    Exit.BIND: "an address cannot be bound (not on this host, privileged port)",
    Exit.TLS: "a TLS file is missing, unreadable or invalid",
    Exit.TPM: "the TPM cannot be opened",
    Exit.DATABASE: "the database cannot be reached",
    Exit.SCHEMA: "the database schema is out of date (auto_migrate_db = false)",
    Exit.DATADIR_LOCKED: "the data directory is in use by another instance",
    Exit.DATADIR: "the data directory cannot be created or written",
    Exit.REGISTRATION: "registration with the registrar failed",
}


class StartupError(Exception):
    """A start-up failure: ``what`` failed, ``fix`` says what to do; ``code`` is the exit code."""

    def __init__(self, code: Exit, what: str, fix: str) -> None:
        super().__init__(f"{what} -- {fix}")
        self.code = code
        self.what = what
        self.fix = fix

    def line(self, prog: str) -> str:
        """The one line printed on stderr (whitespace of embedded texts collapsed)."""
        return " ".join(f"{prog}: {self.what} -- {self.fix}".split())


def find(exc: BaseException) -> StartupError | None:
    """The StartupError inside ``exc`` (nurseries wrap it in exception groups), if any."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = find(sub)
            if found is not None:
                return found
    return None


def exit_codes_epilog() -> str:
    """The exit-code table of the service verbs' ``--help``."""
    rows = "\n".join(f"  {int(code):>3}  {text}{'' if code not in NO_RESTART else '  [no restart]'}"
                     for code, text in MEANINGS.items())
    return "exit codes ([no restart]: listed in the systemd unit's RestartPreventExitStatus=):\n" + rows


# --- listening sockets -------------------------------------------------------------------------------


async def bind(host: str, port: int, *, option: str) -> list[trio.SocketListener]:
    """Listening sockets for ``host:port``; a failure is a StartupError naming ``option``."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise bind_error(exc, host, port, option) from exc


def bind_error(exc: OSError, host: str, port: int, option: str) -> StartupError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            Exit.PORT_IN_USE, f"{option} {where} is already in use",
            f"stop the process listening there (ss -ltnp 'sport = :{port}') or set {option} to a free port")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StartupError(
            Exit.BIND, f"{option} {where}: permission denied",
            "use a port above 1023 or grant the service CAP_NET_BIND_SERVICE")
    reason = exc.strerror or str(exc)
    return StartupError(
        Exit.BIND, f"cannot listen on {option} {where}: {reason}",
        "set the address option (ip / metrics_ip) to an address of this machine, e.g. 0.0.0.0")


async def close_all(listeners: Iterable[trio.SocketListener]) -> None:
    for listener in listeners:
        with trio.CancelScope(shield=True):
            await listener.aclose()


# --- files -------------------------------------------------------------------------------------------


def check_readable(files: Iterable[tuple[str, Path]]) -> None:
    """Every (option, path) is a readable file, else StartupError(TLS) naming the first that is not."""
    for option, path in files:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except FileNotFoundError:
            raise StartupError(Exit.TLS, f"{option} {path}: no such file",
                               f"create it (keytrio ca ...) or set {option} / tls_dir in the configuration") from None
        except IsADirectoryError:
            raise StartupError(Exit.TLS, f"{option} {path} is a directory, not a PEM file",
                               f"set {option} to the file") from None
        except PermissionError:
            raise StartupError(Exit.TLS, f"{option} {path}: permission denied",
                               "make it readable by the service's user (chown / chmod)") from None
        except OSError as exc:
            raise StartupError(Exit.TLS, f"{option} {path}: {exc.strerror or exc}",
                               f"check the file or set {option} in the configuration") from None


def check_keys(files: Iterable[tuple[str, Path]]) -> None:
    """Private keys (options ending in ``_key``) that group/others may access: StartupError(TLS)."""
    from keytrio.actors.common.tls import private_key_problem

    for option, path in files:
        if option.endswith("_key") and (problem := private_key_problem(path)) is not None:
            what, _, fix = problem.partition("; ")
            raise StartupError(Exit.TLS, f"{option}: {what}", fix or f"chmod 600 {path}")


def load_tls(build: Callable[[], T], files: Iterable[tuple[str, Path]]) -> T:
    """``build()`` a TLS context from ``files``; any failure is StartupError(TLS) naming a file."""
    files = list(files)
    check_readable(files)
    try:
        return build()
    except (ssl.SSLError, ValueError) as exc:
        names = ", ".join(f"{option}={path}" for option, path in files)
        reason = getattr(exc, "reason", None) or str(exc)
        raise StartupError(Exit.TLS, f"the TLS files do not load ({reason}): {names}",
                           "check that each is PEM and that the key belongs to the certificate") from exc
    except OSError as exc:  # vanished between the check and the load
        raise StartupError(Exit.TLS, f"TLS file {exc.filename}: {exc.strerror or exc}",
                           "check the file") from exc


# --- data directory ----------------------------------------------------------------------------------


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/<name>.lock``, held while the actor runs.

    The kernel releases it when the process dies (even by SIGKILL), so a stale lock file never
    blocks a restart. ``acquire`` blocks briefly (file system): call it in a worker thread.
    """

    def __init__(self, data_dir: Path, name: str) -> None:
        self.path = Path(data_dir) / f"{name}.lock"
        self.data_dir = Path(data_dir)
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(Exit.DATADIR, f"data_dir {self.data_dir}: {exc.strerror or exc}",
                               "create it writable for the service's user or set data_dir") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StartupError(
                Exit.DATADIR_LOCKED,
                f"data_dir {self.data_dir} is in use by another instance{f' (pid {holder})' if holder else ''}",
                "stop that instance or give this one its own data_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


async def data_dir_ready(data_dir: Path, make: Callable[[Path], Any]) -> None:
    """``make(data_dir)`` (e.g. private_files.private_dir) in a thread; OSError -> StartupError."""
    try:
        await trio.to_thread.run_sync(make, Path(data_dir))
    except OSError as exc:
        raise StartupError(Exit.DATADIR, f"data_dir {data_dir}: {exc.strerror or exc}",
                           "create it writable for the service's user or set data_dir") from exc


async def lock_data_dir(data_dir: Path, name: str) -> DataDirLock:
    return await trio.to_thread.run_sync(DataDirLock(data_dir, name).acquire)


# --- database ----------------------------------------------------------------------------------------


async def open_store(url: str, **kwargs: Any) -> Any:
    """``Store.open(url, **kwargs)`` with its start-up failures as StartupError."""
    import sqlalchemy.exc as sa_exc
    from sqlalchemy.engine import make_url

    from keytrio.actors.common.migrations import SchemaOutOfDate
    from keytrio.actors.common.store import Store

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        shown = "<unparsable database_url>"
    try:
        return await Store.open(url, **kwargs)
    except SchemaOutOfDate as exc:
        what, _, fix = str(exc).partition(": ")
        raise StartupError(Exit.SCHEMA, what, fix or "run `keytrio ACTOR db upgrade`") from exc
    except (ModuleNotFoundError, sa_exc.NoSuchModuleError) as exc:
        raise StartupError(Exit.CONFIG, f"no database driver for {shown} ({exc})",
                           "install it (PostgreSQL: pip install 'keytrio[postgresql]') or fix database_url") from exc
    except sa_exc.ArgumentError as exc:
        raise StartupError(Exit.CONFIG, f"database_url {shown}: {exc}", "fix database_url") from exc
    except OSError as exc:  # the SQLite file's own checks: a directory, a name too long, no access
        raise StartupError(Exit.DATABASE, f"cannot open the SQLite database {shown}: {exc.strerror or exc}",
                           "check that data_dir is writable and the file is a keytrio database") from exc
    except sa_exc.DBAPIError as exc:
        reason = " ".join(str(exc.orig).split()) if exc.orig is not None else type(exc).__name__
        if url.startswith("sqlite"):
            raise StartupError(Exit.DATABASE, f"cannot open the SQLite database {shown}: {reason}",
                               "check that data_dir is writable and the file is a keytrio database") from exc
        raise StartupError(Exit.DATABASE, f"database {shown} unreachable: {reason}",
                           "start the database server or fix database_url (host, port, credentials)") from exc


def freeze_heap() -> None:
    """Move everything alive now (modules, compiled SQL, the app, the TLS contexts) out of the
    collector's reach: a service process calls this once it serves, so that later full
    collections scan only what the requests allocate (one 82 ms full collection was seen in a push
    verifier's run, ≈ 130,000 objects, nearly all from start-up). Garbage is collected first so
    that none of it is kept for the process's life. Process-wide: only an entry point that owns
    its process calls it, never a library or a test run of an actor."""
    gc.collect()
    gc.freeze()
