"""``workers = N``: one verifier service as N processes behind one API port (``keytrio verifier``).

The supervisor (this process) does every start-up step that can fail once, in the order of
startup.py, so that the exit codes stay those of a single process: it loads the TLS files, binds
the API port and the metrics ports (``metrics_port + i`` for worker ``i``; all ``0`` = any free),
opens the database and migrates it (once: N workers migrating at once would race), closes it, and
only then starts N worker processes (``python -m keytrio.actors.verifier.workers``).

Each worker inherits the *listening sockets* (``pass_fds``) and runs the ordinary
:class:`~keytrio.actors.verifier.actor.Verifier` on them as a cluster instance (leases.py) of the
same ``verifier_id``: the workers split the agents by leases, and every route reads the shared
database (``GET /agents`` on any worker lists every agent). The kernel hands each new connection to
whichever worker accepts first: an idle worker wins over a busy one, the backlog belongs to the
socket (not to a worker: a killed worker loses only the connections it had accepted), and the port
stays bound while a worker restarts.

The supervisor talks to a worker over its stdin and stdout pipes: the configuration goes down as
one JSON line, the worker answers ``ready`` once it serves, or its start-up failure as
``failed <json>`` (which the supervisor then reports as its own one line and exit code). A worker
whose stdin reaches EOF (the supervisor died, even by SIGKILL) shuts down cleanly. Workers run in
their own session, so a terminal's Ctrl-C reaches them only through the supervisor.

A worker that dies is restarted after a backoff (0.5 s doubling to 30 s; reset once it ran for a
minute); a worker start-up failure a restart cannot help (startup.NO_RESTART) stops the service
with that code. Cancelling :meth:`Supervisor.run` (SIGTERM/SIGINT) sends SIGTERM to every worker
and waits for all of them (SIGKILL after ``graceful_timeout`` + 30 s).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from keytrio.actors.common import logs, startup
from keytrio.actors.common.config import Config
from keytrio.actors.common.startup import Exit, StartupError
from keytrio.actors.verifier.actor import Listeners, Verifier, load_tls
from keytrio.actors.verifier.config import load_config, resolve, worker_count
from keytrio.actors.verifier.migrations import MIGRATIONS

log = logging.getLogger("keytrio.verifier.workers")

WORKER_MODULE = "keytrio.actors.verifier.workers"
READY = b"ready"
FAILED = b"failed "
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.5, 30.0, 60.0


def make_service(config: Config) -> Verifier | Supervisor:
    """What ``keytrio verifier`` runs: a Verifier, or a Supervisor of ``worker_count`` workers."""
    n = worker_count(config)
    if n > 1:
        return Supervisor(config, n)
    verifier = Verifier(config)
    verifier.freeze_heap = True  # this process is the verifier's own (keytrio verifier, bench)
    return verifier


def backoff(failures: int) -> float:
    """Seconds before restarting a worker that died ``failures`` times in a row (>= 1)."""
    return min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)


@dataclass
class Worker:
    """One worker slot: its index, its metrics listeners, and the pid of its current process."""

    index: int
    metrics: list[trio.SocketListener]
    pid: int | None = None
    starts: int = 0
    ready: trio.Event | None = None


class Supervisor:
    """``Supervisor(config, n).run()``: the service as ``n`` worker processes (see the module doc)."""

    def __init__(self, config: Config, workers: int) -> None:
        self.settings = resolve(config)  # ConfigError before anything starts
        self.config = config.replace(workers=1, cluster=True)  # what each worker runs
        self.n = workers
        self.address: tuple[str, int] | None = None
        self.metrics_addresses: list[tuple[str, int]] = []
        self.workers: list[Worker] = []

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        load_tls(self.settings, cfg)  # a TLS failure is the supervisor's, before any port is bound
        api: list[trio.SocketListener] = []
        metrics: list[list[trio.SocketListener]] = []
        try:
            api = await startup.bind(cfg.ip, cfg.port, option="port")
            if cfg.metrics_port >= 0:
                for i in range(self.n):
                    port = cfg.metrics_port + i if cfg.metrics_port > 0 else 0
                    metrics.append(await startup.bind(cfg.metrics_ip, port, option="metrics_port"))
            await self._migrate()
            self.workers = [Worker(i, metrics[i] if metrics else []) for i in range(self.n)]
            self.address = _address(api)
            self.metrics_addresses = [_address(m) for m in metrics]
            async with trio.open_nursery() as nursery:
                for w in self.workers:
                    w.ready = trio.Event()
                    nursery.start_soon(self._keep, w, api)
                for w in self.workers:
                    assert w.ready is not None
                    await w.ready.wait()
                log.info("event=verifier.workers_started workers=%d https=%s:%d metrics=%s pids=%s",
                         self.n, *self.address,
                         ",".join(f"{h}:{p}" for h, p in self.metrics_addresses) or "disabled",
                         ",".join(str(w.pid) for w in self.workers))
                task_status.started(self.address)
        finally:
            await startup.close_all([*api, *(sock for m in metrics for sock in m)])
            if self.address is not None:  # the workers ran (a failed start logs nothing more)
                log.info("event=verifier.workers_stopped workers=%d", self.n)

    async def _migrate(self) -> None:
        """Open the database once (reachable? schema current or migrated?) before any worker."""
        store = await startup.open_store(self.settings.database_url, pool_size=1, max_overflow=0, migrations=MIGRATIONS,
                                         auto_migrate=self.config.auto_migrate_db)
        with trio.CancelScope(shield=True):
            await store.close()

    async def _keep(self, w: Worker, api: list[trio.SocketListener]) -> None:
        """Run worker ``w``, restarting it (with backoff) whenever it dies, until cancelled."""
        failures = 0
        while True:
            started = trio.current_time()
            code, failure = await self._run_worker(w, api)
            if failure is not None and (failure.code in startup.NO_RESTART or w.starts == 1):
                raise failure  # a restart cannot help, or the very first start failed: stop the service
            failures = 1 if trio.current_time() - started >= BACKOFF_RESET else failures + 1
            delay = backoff(failures)
            log.warning("event=verifier.worker_died worker=%d pid=%s exit=%s restart_in=%.1fs",
                        w.index, w.pid, code, delay)
            await trio.sleep(delay)

    async def _run_worker(self, w: Worker, api: list[trio.SocketListener]) -> tuple[int, StartupError | None]:
        """One process of worker ``w`` until it exits: (its exit code, its start-up failure if any)."""
        fds = [sock.socket.fileno() for sock in [*api, *w.metrics]]
        hello = json.dumps({
            "config": dict(self.config), "index": w.index, "log": _log_settings(),
            "api_fds": fds[:len(api)], "metrics_fds": fds[len(api):],
        }, default=str).encode() + b"\n"
        failure: StartupError | None = None
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(partial(
                trio.run_process, [sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, pass_fds=fds, check=False, start_new_session=True,
                deliver_cancel=partial(_terminate, grace=self.config.graceful_timeout + 30.0)))
            w.pid, w.starts = proc.pid, w.starts + 1
            assert proc.stdin is not None and proc.stdout is not None
            try:
                await proc.stdin.send_all(hello)  # stdin stays open: its EOF tells the worker we are gone
            except trio.BrokenResourceError:  # it died at once: its exit code tells the rest
                pass
            async for line in _lines(proc.stdout):
                if line == READY:
                    log.info("event=verifier.worker_ready worker=%d pid=%d", w.index, proc.pid)
                    assert w.ready is not None
                    w.ready.set()
                elif line.startswith(FAILED):
                    doc = json.loads(line[len(FAILED):])
                    failure = StartupError(Exit(doc["code"]), doc["what"], doc["fix"])
            await proc.wait()
            await proc.stdin.aclose()
        assert proc.returncode is not None
        return proc.returncode, failure


async def _terminate(proc: trio.Process, *, grace: float) -> None:
    """Shutdown of one worker: SIGTERM (a clean stop), SIGKILL if it has not exited after ``grace``."""
    proc.send_signal(signal.SIGTERM)
    await trio.sleep(grace)
    log.warning("event=verifier.worker_killed pid=%d after=%.0fs", proc.pid, grace)
    proc.kill()


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    """The lines of ``stream`` until EOF (the worker exited)."""
    buf = b""
    while chunk := await stream.receive_some():
        buf += chunk
        *done, buf = buf.split(b"\n")
        for line in done:
            yield line.strip()


def _address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    host, port = listeners[0].socket.getsockname()[:2]
    return str(host), int(port)


def _log_settings() -> dict[str, str]:
    """The supervisor's log level and format, for its workers."""
    root = logging.getLogger()
    json_fmt = any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers)
    return {"level": logging.getLevelName(root.level), "format": "json" if json_fmt else "text"}


# --- the worker process ------------------------------------------------------------------------------


def _listeners(fds: list[int]) -> list[trio.SocketListener]:
    return [trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))) for fd in fds]


def _say(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


async def _serve(verifier: Verifier) -> None:
    """Run until SIGTERM/SIGINT or the supervisor's pipe closes; later signals are ignored, so a
    SIGTERM from both systemd and the supervisor still ends in one clean shutdown."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(verifier.run)
            _say(READY)

            async def until_signal() -> None:
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

            async def until_orphaned() -> None:
                stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
                while await stdin.receive_some():
                    pass
                log.warning("event=verifier.worker_orphaned pid=%d", os.getpid())
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_signal)
            nursery.start_soon(until_orphaned)


def worker_main() -> int:
    """``python -m keytrio.actors.verifier.workers``: one worker (the supervisor starts it)."""
    hello = json.loads(sys.stdin.buffer.readline() or b"{}")
    if not hello:
        print("keytrio verifier worker: started without a supervisor -- run `keytrio verifier`", file=sys.stderr)
        return int(Exit.CONFIG)
    logs.setup(hello["log"]["level"], hello["log"]["format"])
    config = load_config(None, env={}, overrides=hello["config"])
    verifier = Verifier(config, listeners=Listeners(_listeners(hello["api_fds"]), _listeners(hello["metrics_fds"])))
    verifier.freeze_heap = True
    try:
        trio.run(_serve, verifier)
    except BaseException as exc:
        error = startup.find(exc)
        if error is None:
            raise  # a bug: the traceback is the report (exit 1), the supervisor restarts the worker
        _say(FAILED + json.dumps({"code": int(error.code), "what": error.what, "fix": error.fix}).encode())
        return int(error.code)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())

__all__ = ["Supervisor", "backoff", "make_service", "worker_main"]
