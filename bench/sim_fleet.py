"""Benchmark 4b: one verifier and thousands of simulated agents (bench.sim_agent), no swtpm.

    python -m bench.sim_fleet --out DIR [--sizes 1000,5000] [--seconds 30] [--quote-interval S]
                              [--register 100] [--verifier-dir /dev/shm] [--upstream-dir UP_DIR --upstream-sizes 50]
                              [--agent-procs K] [--workers 1,2 [--database postgresql] [--pg-url URL]]
                              [--enrol-concurrency 32]
                              [--py-spy FILE [--py-spy-of pull|push]] [--cprofile FILE]
                              [--push [--upstream-push-dir UP_PUSH_DIR]] [--mixed]

Processes (the verifier pinned to ``--cpu``, default the last CPU; everything else on the others):
- ``--agent-procs`` K agents processes (``python -m bench.sim_agent``, default 1): process p holds
  the agents p, p + K, ..., each its own RSA-2048 EK and AK and loopback address, one port per
  process; K > 1 when one process cannot sign every quote asked for;
- keytrio's registrar (``bench.registration serve``, SQLite): the first ``--register`` agents
  (default 100) register and activate (ActivateCredential in software) before the enrolments;
  every agent could (the test does it), but at this machine's ~10-150 registrations/s (benchmark 5)
  thousands would take minutes that measure the registrar, not the verifier;
- keytrio's verifier (``bench.keytrio_server``), a fresh one per N and per ``--workers`` count:
  1 worker on SQLite (unless ``--database postgresql``), N workers as a supervisor and N worker
  processes (actors/verifier/workers.py) on a fresh PostgreSQL database (``--pg-url``, else the
  server testbed/postgres.py finds or starts), all pinned to ``--cpu``; its CPU is that of the
  supervisor and every worker, its PostgreSQL backends' CPU (pg_stat_activity) is reported apart;
  ``quote_interval``
  = ``--quote-interval`` (default: 2 s up to 400 agents, else N / 200 s, so that the one-core
  agents process can sign every quote asked for: ~1 ms of RSA-2048 per quote);
- with ``--upstream-dir``: upstream's verifier from tests/interop/upstream/up.sh (its process group,
  workers included, measured together), same agents and enrolment JSON, its own quote_interval.

Per side and N the window of bench.fleet: enrol (the fields upstream's tenant POSTs, a named
runtime policy of ``--policy-files`` files covering each agent's ``boot_aggregate`` + 5 files, PCR
mask 0x400, PCR 16 always), wait for every agent's first attestation and one more interval, then
``--seconds`` of verifier CPU (utime + stime from /proc) against the integrity quotes the agents
served in that same window (read next to the CPU; Σ ``attestation_count`` deltas of bulk GETs
around the window are in the row as ``polls_committed``, the count before 2026-12-05).
**Agents per core at 2 s** = 2 s ÷ CPU per poll: how many agents one fully used core would keep
at a 2 s interval at that per-poll cost (polls cost the same at any interval: each is a fresh
quote over a kept connection). The agents process's own CPU per poll is reported too.

``--push``: per N also a push-mode row (bench.sim_push): N more simulated machines of their own
keys (the first ``--register`` registered too), enrolled push-mode on a fresh keytrio verifier in
``mode = push`` with the same policy and interval, each cycling session -> capabilities -> evidence
from this process (``--push-client``: lean per-agent connections by default, or httpx); verifier
CPU per accepted (passed) attestation over the same kind of window.
With ``--upstream-push-dir`` (an up.sh DIR in push mode, bench.sim_push_upstream) the same push
agents also drive upstream's push verifier at ``--upstream-sizes``: an "upstream push" row.
``--pull-floor``: the N pull agents are also polled by bench.floor_pull, the poll's floor (a
minimal poller doing only what a pull verifier must per poll): a "pull floor" row.
``--push-floor full|bare|full,bare`` (with ``--push``): the same push agents also drive
bench.floor_push, the push cycle's floor (a minimal v3.0 server that does only what the wire
requires; ``bare``: not even a store or the answers' full documents): "push floor" rows.

``--mixed``: per N also a "mixed" row: a fresh keytrio verifier (1 worker, SQLite) in ``mode = both``
driven by the N pull agents and N push agents together (enrolled as in the two rows above, the
window the same), reporting its CPU over the window against the pull polls (Σ
``attestation_count`` deltas of the pull agents) and push attestations (202s) counted apart, CPU
per (poll + attestation), the push agents' latency, and the store's group commits in the window
(``store``: commits by what they held, writes by kind, ``mean_group.pull_group`` = background
writes per commit holding any) read from the verifier's /metrics just before and after it; and
``model``: the CPU that polls x the pull row's CPU per poll + attestations x the push row's CPU
per attestation of the same run would predict (with ``--push``). With ``--mixed`` every 1-worker
keytrio row of the run serves /metrics (a gauge recount a second, alike in each row) and reports
its ``store`` counts the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import fleet, sim_agent

REPO = Path(__file__).resolve().parents[1]
AUTO_RATE = 200.0  # polls/s the auto quote interval aims at (the agents process signs each one)


def auto_interval(n: int) -> float:
    return max(2.0, n / AUTO_RATE)


class SimProcess(fleet.ChildProcess):
    """The controller's handle on one ``python -m bench.sim_agent`` (agents offset, offset + stride, ...)."""

    label = "sim agents"

    def __init__(self, client_ca: Path, policy_files: int, max_agents: int, cpus: set[int], log: Path,
                 offset: int = 0, stride: int = 1) -> None:
        super().__init__(["-m", "bench.sim_agent", str(client_ca), str(policy_files), str(max_agents),
                          str(offset), str(stride)], {"PYTHONPATH": str(REPO)}, cpus, log)  # fmt: skip
        self.label = f"sim agents {offset}"

    def _read(self) -> dict[str, Any]:
        reply = super()._read()
        if "error" in reply:
            raise RuntimeError(f"{self.label}: {reply['error']}")
        return reply

    def post(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()


class SimFleet:
    """``k`` agents processes sharing out one fleet: process ``p`` holds the agents ``p``, ``p + k``, ...
    (each its own port, its loopback addresses, its keys); they generate keys, register and serve in
    parallel, so the agents side is not one core's worth of RSA signatures."""

    def __init__(self, k: int, client_ca: Path, policy_files: int, max_agents: int, cpus: set[int],
                 out: Path) -> None:
        self.procs: list[SimProcess] = []
        try:
            for p in range(k):
                log = out / ("sim-agents.log" if k == 1 else f"sim-agents-{p}.log")
                self.procs.append(SimProcess(client_ca, policy_files, max_agents, cpus, log, p, k))
            self.hello = [sp._read() for sp in self.procs]  # key pools made at the same time
        except BaseException:
            self.close()
            raise
        self.registered = 0

    def pids(self) -> list[int]:
        return [sp.proc.pid for sp in self.procs]

    def cpu(self) -> float:
        return fleet.usage(self.pids())[0]

    def _all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for sp in self.procs:
            sp.post(cmd)
        return [sp._read() for sp in self.procs]

    def grow(self, n: int, registrar: str | None, register: int = 0) -> dict[str, Any]:
        upto = min(n, register)
        replies = self._all({"op": "grow", "n": n, "registrar": registrar if upto > self.registered else None,
                             "register_upto": upto})  # fmt: skip
        reg = sum(r["registered"] for r in replies)
        self.registered += reg
        agents = sorted((a for r in replies for a in r["agents"]), key=lambda a: a["index"])
        return {"agents": agents, "registered": reg, "seconds": max(r["seconds"] for r in replies)}

    def connections(self) -> int:
        """Connections the agents have accepted so far (each one a TLS handshake)."""
        return sum(r["connections"] for r in self.served())

    def served(self) -> list[dict[str, int]]:
        """Per process: integrity quotes signed and connections accepted so far."""
        return self._all({"op": "served"})

    def quotes_served(self) -> int:
        """Integrity quotes the agents have signed so far: the polls of whichever verifier runs
        (fleet._window's ``served``)."""
        return sum(r["served"] for r in self.served())

    def close(self) -> None:
        for sp in self.procs:
            sp.close()


def _start_registrar(ca: Path, data: Path, cpus: set[int], log: Any) -> tuple[subprocess.Popen[str], str]:
    srv, port = fleet.start_child(["-m", "bench.registration", "serve", str(ca), str(data)], cpus, log,
                                  "keytrio registrar", ready="PORTS ")
    return srv, f"http://127.0.0.1:{port}"


def _stop(srv: subprocess.Popen[str], cprofile: bool = False) -> None:
    if cprofile:
        srv.send_signal(signal.SIGINT)  # KeyboardInterrupt: cProfile writes its file
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    fleet.stop_child(srv)


def _handshakes(r: dict[str, Any], connections: int) -> dict[str, Any]:
    """Connections the verifier opened to agents in the window, per poll (0 when every poll reuses a
    kept-alive connection; near 1 when every poll pays a TLS handshake on both sides)."""
    return {"connections_in_window": connections,
            "handshakes_per_poll": connections / r["polls"] if r["polls"] else None}  # fmt: skip


def _row_extra(r: dict[str, Any], agents_cpu_s: float) -> dict[str, Any]:
    cpp = r["cpu_per_poll"]
    side = r["side_cpu_s"] / r["polls"] if r["polls"] and r.get("side_cpu_s") else None
    return {"agents_per_core_2s": 2.0 / cpp if cpp else None,
            "agents_process_cpu_per_poll": agents_cpu_s / r["polls"] if r["polls"] else None,
            "db_cpu_per_poll": side,
            "agents_per_core_2s_with_db": 2.0 / (cpp + side) if cpp and side else None}  # fmt: skip


def _commit() -> str | None:
    """The checked-out commit of this tree (which code a recorded figure measured)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None


def keytrio_sides(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(workers, database) of each keytrio row: ``--workers`` in order; more than one worker needs
    PostgreSQL, one worker runs on SQLite (the default setup) unless ``--database postgresql``."""
    return [(w, "postgresql" if w > 1 or args.database == "postgresql" else "sqlite")
            for w in (int(x) for x in str(args.workers).split(",") if x)]  # fmt: skip


def side_name(workers: int, database: str) -> str:
    return f"keytrio {workers} worker{'s' if workers > 1 else ''} ({'PostgreSQL' if database == 'postgresql' else 'SQLite'})"


def upstream_workers(up_dir: Path) -> int | None:
    """``max_workers`` of an up.sh instance's verifier.conf (KL_MAX_WORKERS)."""
    for line in (up_dir / "conf" / "verifier.conf").read_text().splitlines():
        if line.replace(" ", "").startswith("max_workers="):
            return int(line.split("=", 1)[1])
    return None


class PgDatabase:
    """A fresh PostgreSQL database for one keytrio verifier, dropped (WITH (FORCE)) on exit; its
    backends' pids come from pg_stat_activity (the verifier's own connections, not the server's
    background writer, WAL writer and checkpointer)."""

    def __init__(self, admin_url: str) -> None:
        import sqlalchemy as sa

        self.admin_url = admin_url
        self.name = f"keytrio_bench_{os.urandom(6).hex()}"
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.url = sa.engine.make_url(admin_url).set(database=self.name).render_as_string(hide_password=False)

    def __enter__(self) -> PgDatabase:
        import sqlalchemy as sa

        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        return self

    def backends(self) -> list[int]:
        import sqlalchemy as sa

        with self.admin.connect() as conn:
            rows = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": self.name})
            return [int(r[0]) for r in rows]

    def __exit__(self, *exc: object) -> None:
        from keytrio.testbed.postgres import drop_database

        self.admin.dispose()
        drop_database(self.admin_url, self.name)  # past an autovacuum worker that FORCE may not end


def _keytrio_side(args: argparse.Namespace, ca: Path, data_dir: Path, cpu: int, klog: Any, ctx: Any, limits: Any,
                  agents: list[dict[str, Any]], body: dict[str, Any], qi: float, sims: SimFleet, workers: int,
                  database: str) -> dict[str, Any]:
    """A fresh keytrio verifier of ``workers`` processes on ``database`` (pinned to ``cpu``, the
    workers too); its CPU is that of the supervisor and all its workers (fleet.tree_pids)."""
    options: dict[str, Any] = {"quote_interval": qi, "workers": workers}
    mport = fleet.free_port() if args.mixed and workers == 1 else None  # the store's counts
    if mport is not None:
        options.update(metrics_ip="127.0.0.1", metrics_port=mport)
    with contextlib.ExitStack() as stack:
        pg = None
        if database == "postgresql":
            from keytrio.testbed.postgres import find_server

            pg = stack.enter_context(PgDatabase(find_server(args.pg_url)))
            options["database_url"] = pg.url

        async def side() -> dict[str, Any]:
            async with httpx.AsyncClient(verify=ctx, timeout=120.0, limits=limits) as client:
                srv, url = fleet._start_keytrio(ca, data_dir, cpu, klog, args.cprofile, options=options)
                spy: list[subprocess.Popen[bytes]] = []
                sims_cpu: list[float] = []
                conns: list[int] = []

                def start_spy() -> None:
                    sims_cpu.append(sims.cpu())
                    conns.append(sims.connections())
                    if args.py_spy and args.py_spy_of == "pull":
                        spy.append(subprocess.Popen(
                            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                             str(srv.pid), "--format", "raw", "--rate", "100", "--nonblocking",
                             "-d", str(int(args.seconds)), "-o", args.py_spy, *(["--subprocesses"] if workers > 1 else [])],
                            stdout=klog, stderr=klog))  # fmt: skip

                try:
                    await fleet._upload(client, url, body)
                    await trio.sleep(0.5)
                    rss0 = fleet.usage(fleet.tree_pids(srv.pid))[1]
                    r = await fleet._window(client, url, agents, lambda: fleet.tree_pids(srv.pid), qi, args.seconds,
                                            rss0, on_window=start_spy, concurrency=args.enrol_concurrency,
                                            side_pids=pg.backends if pg else None,
                                            counts=partial(fleet.store_counts, mport) if mport else None,
                                            served=sims.quotes_served)  # fmt: skip
                    return {**r, "quote_interval": qi, "workers": workers, "database": database,
                            "pg_database": pg.name if pg else None, **_row_extra(r, sims.cpu() - sims_cpu[0]),
                            **_handshakes(r, sims.connections() - conns[0])}
                finally:
                    for p in spy:
                        p.wait()
                    _stop(srv, bool(args.cprofile))

        return trio.run(side)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from keytrio.actors.common import tls
    from keytrio.testbed.pki import make_cv_ca

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    others = set(os.sched_getaffinity(0)) - {cpu} or {cpu}
    sizes = [int(s) for s in str(args.sizes).split(",") if s]
    up_sizes = ([int(s) for s in str(args.upstream_sizes).split(",") if s]
                if args.upstream_dir or (args.push and args.upstream_push_dir) else [])
    report: dict[str, Any] = {
        "sizes": sizes, "upstream_sizes": up_sizes, "seconds": args.seconds, "policy_files": args.policy_files,
        "files_per_agent": sim_agent.FILES_PER_AGENT, "verifier_cpu": cpu, "agents_cpus": sorted(others),
        "registered": args.register, "agent_procs": args.agent_procs, "enrol_concurrency": args.enrol_concurrency,
        "workers": keytrio_sides(args), "rows": [], "stopped": {}, "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _commit(), "verifier_dir": args.verifier_dir or tempfile.gettempdir(),
    }  # fmt: skip
    up_env: dict[str, str] = {}
    if args.upstream_dir:
        from bench.http_load import _env_sh, pin_group

        up_env = _env_sh(args.upstream_dir)
        up_pgid = int((args.upstream_dir / "run" / "verifier.pid").read_text().strip())
        pin_group(up_pgid, cpu)
        report["quote_interval_upstream"] = fleet._upstream_interval(args.upstream_dir)
        report["upstream_workers"] = upstream_workers(args.upstream_dir)
    os.sched_setaffinity(0, others)
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-sim-") as tmp, \
            tempfile.TemporaryDirectory(prefix="keytrio-bench-sim-verifier-", dir=args.verifier_dir) as vtmp, \
            open(out / "sim-keytrio-verifier.log", "w") as klog, open(out / "sim-registrar.log", "w") as rlog:
        # one CA for everything, so one client context talks to both verifiers (upstream's when given)
        ca = Path(up_env["KL_CA_DIR"]) if up_env else make_cv_ca(Path(tmp) / "cv_ca").dir
        ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        t0 = time.monotonic()
        sims = SimFleet(args.agent_procs, ca / "cacert.crt", args.policy_files, max(sizes + up_sizes), others, out)
        report["keys_s"] = time.monotonic() - t0
        pushers = None
        up_push = None
        if args.push or args.mixed:  # the push agents live in this process (bench.sim_push), keys of their own
            if args.push and args.upstream_push_dir:
                from bench.sim_push_upstream import UpstreamPush

                up_push = UpstreamPush(args.upstream_push_dir)
                up_push.pin(cpu)
                report["quote_interval_upstream_push"] = up_push.quote_interval
            pool = sim_agent.sim_keys.PrimePool(sim_agent.keys_for(max(sizes + (up_sizes if up_push else []))))
            pushers = sim_agent.SimAgents(ca / "cacert.crt", pool, args.policy_files, Path(tmp) / "push")
            pushers.port = 9002  # registered, never listened on: push agents dial out only
        registrar = None
        if args.register > 0:
            reg_srv, registrar = _start_registrar(ca, Path(tmp) / "registrar", others, rlog)
        try:
            for k, n in enumerate(sorted(set(sizes + up_sizes))):
                t0 = time.monotonic()
                grown = sims.grow(n, registrar, args.register)
                agents = grown["agents"][:n]
                print(f"[bench] sim: {n} agents up ({grown['registered']} more registered) in "
                      f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
                body = fleet.policy_body(args.policy_files, {a["boot_aggregate"] for a in agents})
                row: dict[str, Any] = {"n": n, "grow_s": grown["seconds"]}
                if n in sizes:
                    qi = args.quote_interval if args.quote_interval else auto_interval(n)
                    for w, db in keytrio_sides(args):
                        name = side_name(w, db)
                        try:
                            row[name] = _keytrio_side(args, ca, Path(vtmp) / f"verifier-{k}-{w}-{db}", cpu, klog, ctx,
                                                      limits, agents, body, qi, sims, w, db)  # fmt: skip
                            _say(name, row[name])
                        except (RuntimeError, httpx.HTTPError, OSError) as exc:
                            report["stopped"][name] = f"N={n}: {exc}"
                if args.pull_floor and n in sizes:
                    row["pull floor"] = _pull_floor_side(args, ca, cpu, klog, ctx, limits, agents, body,
                                                         args.quote_interval or auto_interval(n), sims, report)
                if args.push and n in sizes:
                    row["push"] = _push_side(args, ca, Path(vtmp) / f"push-verifier-{k}", cpu, klog, ctx, n,
                                             args.quote_interval or auto_interval(n), body, pushers, registrar,
                                             report)  # fmt: skip
                    for kind in args.push_floor or ():
                        row[PUSH_FLOORS[kind]] = _push_floor_side(args, ca, cpu, klog, ctx, n,
                                                     args.quote_interval or auto_interval(n), body, pushers, report,
                                                     kind)  # fmt: skip
                if args.mixed and n in sizes:
                    row["mixed"] = _mixed_side(args, ca, Path(vtmp) / f"mixed-verifier-{k}", cpu, klog, ctx, limits,
                                               agents, body, args.quote_interval or auto_interval(n), sims, pushers,
                                               registrar, report)  # fmt: skip
                    if row["mixed"] is not None:
                        row["mixed"]["model"] = mixed_model(row["mixed"], row.get(side_name(1, "sqlite")),
                                                            row.get("push"))
                        _say_mixed(row["mixed"])
                if n in up_sizes and args.upstream_dir:
                    row["upstream"] = _upstream_side(args, up_env, up_pgid, ctx, limits, agents, body, sims, report)
                if up_push is not None and n in up_sizes:
                    row["upstream push"] = _upstream_push_side(args, up_push, n, body, pushers, report)
                served = sims.served()
                report["rows"].append({**row, "loadavg": os.getloadavg(),
                                       "served_per_agents_process": [s["served"] for s in served],
                                       "connections_per_agents_process": [s["connections"] for s in served]})
        finally:
            sims.close()
            if registrar is not None:
                _stop(reg_srv)
            os.sched_setaffinity(0, others | {cpu})
    report["loadavg_end"] = os.getloadavg()
    (out / "sim_fleet.json").write_text(json.dumps(report, indent=1))
    return report


def _upstream_side(args: argparse.Namespace, env: dict[str, str], pgid: int, ctx: Any, limits: Any,
                   agents: list[dict[str, Any]], body: dict[str, Any], sims: SimFleet,
                   report: dict[str, Any]) -> dict[str, Any] | None:
    qi = report["quote_interval_upstream"]
    url = env["KL_VERIFIER_URL"]

    async def side() -> dict[str, Any]:
        async with httpx.AsyncClient(verify=ctx, timeout=120.0, limits=limits) as client:
            await fleet._upload(client, url, body)
            await trio.sleep(0.5)
            rss0 = fleet.usage(fleet.group_pids(pgid))[1]
            sims_cpu: list[float] = []
            conns: list[int] = []
            try:
                r = await fleet._window(client, url, agents, lambda: fleet.group_pids(pgid), qi, args.seconds, rss0,
                                        on_window=lambda: (sims_cpu.append(sims.cpu()),
                                                           conns.append(sims.connections())),
                                        concurrency=args.enrol_concurrency, served=sims.quotes_served)
                return {**r, "quote_interval": qi, "workers": report.get("upstream_workers"),
                        **_row_extra(r, sims.cpu() - sims_cpu[0]), **_handshakes(r, sims.connections() - conns[0])}
            finally:
                if not await fleet._delete_all(client, url, [a["id"] for a in agents], timeout=60 + 0.2 * len(agents)):
                    report["stopped"]["upstream"] = f"agents of N={len(agents)} not deleted within the timeout"

    try:
        r = trio.run(side)
    except (RuntimeError, httpx.HTTPError) as exc:
        report["stopped"]["upstream"] = f"N={len(agents)}: {exc}"
        return None
    _say("upstream", r)
    return r


def _push_side(args: argparse.Namespace, ca: Path, data_dir: Path, cpu: int, log: Any, ctx: Any, n: int,
               qi: float, body: dict[str, Any], pushers: Any, registrar: str | None,
               report: dict[str, Any]) -> dict[str, Any] | None:
    from bench import sim_push

    agents, new = _push_agents(n, pushers)
    spy: list[subprocess.Popen[bytes]] = []

    def start_spy(pid: int) -> None:
        # the push verifier is one process (mode = push: one worker); --gil: the samples of the
        # thread that runs Python (event loop or store thread), as docs/performance.md 4c.7 took them
        spy.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--gil", "--format", "raw",
             "--rate", "300", "--nonblocking", "-d", str(int(args.seconds)), "-o", args.py_spy],
            stdout=log, stderr=log))  # fmt: skip

    async def side() -> dict[str, Any]:
        await _register_push(args, n, pushers, new, registrar)
        async with httpx.AsyncClient(verify=ctx, timeout=120.0) as admin:
            return await sim_push.push_side(admin, ca, data_dir, cpu, log, agents, body, qi, args.seconds,
                                            args.push_client == "lean",
                                            on_window=start_spy if args.py_spy and args.py_spy_of == "push" else None,
                                            metrics_port=fleet.free_port() if args.mixed else None)

    try:
        r = trio.run(side)
    except (RuntimeError, httpx.HTTPError) as exc:
        report["stopped"]["push"] = f"N={n}: {exc}"
        return None
    finally:
        for p in spy:
            p.wait()
    _say("keytrio push", r)
    return r


def _pull_floor_side(args: argparse.Namespace, ca: Path, cpu: int, log: Any, ctx: Any, limits: Any,
                     agents: list[dict[str, Any]], body: dict[str, Any], qi: float, sims: SimFleet,
                     report: dict[str, Any]) -> dict[str, Any] | None:
    """The pull agents polled by bench.floor_pull (a fresh one, pinned as the verifiers are)."""
    from bench import floor_pull

    async def side() -> dict[str, Any]:
        async with httpx.AsyncClient(verify=ctx, timeout=120.0, limits=limits) as admin:
            sims_cpu: list[float] = []
            conns: list[int] = []
            r = await floor_pull.floor_side(admin, ca, cpu, log, agents, body, qi, args.seconds, sims.quotes_served,
                                            args.enrol_concurrency,
                                            on_window=lambda: (sims_cpu.append(sims.cpu()),
                                                               conns.append(sims.connections())))
            return {**r, **_row_extra(r, sims.cpu() - sims_cpu[0]), **_handshakes(r, sims.connections() - conns[0])}

    try:
        r = trio.run(side)
    except (RuntimeError, httpx.HTTPError, OSError) as exc:
        report["stopped"]["pull floor"] = f"N={len(agents)}: {exc}"
        return None
    _say("pull floor", r)
    return r


def _push_floor_side(args: argparse.Namespace, ca: Path, cpu: int, log: Any, ctx: Any, n: int, qi: float,
                     body: dict[str, Any], pushers: Any, report: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The push row's agents against bench.floor_push, ``kind`` full or bare (after the push row:
    registered already)."""
    from bench import floor_push

    name = PUSH_FLOORS[kind]
    agents, _new = _push_agents(n, pushers)

    async def side() -> dict[str, Any]:
        async with httpx.AsyncClient(verify=ctx, timeout=120.0) as admin:
            return await floor_push.floor_side(admin, ca, cpu, log, agents, body, qi, args.seconds,
                                               bare=kind == "bare")

    try:
        r = trio.run(side)
    except (RuntimeError, httpx.HTTPError) as exc:
        report["stopped"][name] = f"N={n}: {exc}"
        return None
    _say(name, r)
    return r


def _push_agents(n: int, pushers: Any) -> tuple[list[Any], list[Any]]:
    """The first ``n`` push agents (made when missing) and those just made."""
    new = pushers.grow(n, salt="push")
    return pushers.agents[:n], new


async def _register_push(args: argparse.Namespace, n: int, pushers: Any, new: list[Any], registrar: str | None) -> None:
    """Register (no contact) the ones of ``new`` among the first ``--register`` push agents."""
    from bench import sim_push

    if registrar is not None:
        done = len(pushers.agents) - len(new)
        await sim_push.register(new[: max(0, min(n, args.register) - done)], registrar)


async def mixed_window(admin: httpx.AsyncClient, url: str, ca_file: Path, pids: Any, pull: list[dict[str, Any]],
                       push: list[Any], qi: float, seconds: float, counts: Any, concurrency: int = 8,
                       lean: bool = True, served: Any = None) -> dict[str, Any]:
    """Enrol the ``pull`` agents (as fleet._window) and the ``push`` agents (as sim_push.push_window,
    started as enrolled) on one verifier in mode = both, wait until every one attested once and one
    interval more, then measure one window of the CPU of ``pids()``: pull polls (the quotes the
    pull agents served in the window, ``served()`` read next to the CPU as fleet._window does; without
    it Σ ``attestation_count`` deltas of the pull agents over the bulk GETs around the window, per
    second of their span) and push attestations (202s in the window, per second of it, as the push
    row) apart; ``counts()`` (fleet.store_counts) read just before and after the window."""
    from bench import sim_push

    n_pull, n_push = len(pull), len(push)
    pull_ids, push_ids = [a["id"] for a in pull], [s.agent_id for s in push]

    async def enrol(a: dict[str, Any]) -> int:
        return (await admin.post(f"{url}/v{fleet.API}/agents/{a['id']}", json=fleet.enrolment(a))).status_code

    async with sim_push.push_client(ca_file, n_push) as client, trio.open_nursery() as nursery:
        t0 = time.monotonic()
        refused = [st for st in await fleet._each(pull, enrol, concurrency) if st != 200]
        if refused:
            raise RuntimeError(f"{url}: {len(refused)} of {n_pull} pull enrolments refused ({sorted(set(refused))})")
        agents = [sim_push.PushAgent(s, url, tls_client(ca_file) if lean else client) for s in push]
        await sim_push.start_agents(admin, url, agents, qi, nursery)
        enrol_s = time.monotonic() - t0
        ids = pull_ids + push_ids
        attested = await fleet.wait_attested(admin, url, ids, bulk=sim_push._bulk)
        await trio.sleep(math.ceil(qi))
        t_a, before = await sim_push._bulk(admin, url)
        store_a = await counts()
        served_a = served() if served is not None else 0
        cpu_a, sent_a = fleet.usage(pids())[0], sum(a.sent for a in agents)
        us_a = fleet._user_sys(pids())
        w0 = time.monotonic()
        await trio.sleep(seconds)
        cpu_b, rss = fleet.usage(pids())
        us_b, sent_b = fleet._user_sys(pids()), sum(a.sent for a in agents)
        served_b = served() if served is not None else 0
        wall = time.monotonic() - w0
        store_b = await counts()
        t_b, after = await sim_push._bulk(admin, url)
        nursery.cancel_scope.cancel()

    def delta(i: str) -> int:
        return after.get(i, {}).get("attestation_count", 0) - before.get(i, {}).get("attestation_count", 0)

    states: dict[str, int] = {}
    for i in ids:
        st = str(after.get(i, {}).get("operational_state"))
        states[st] = states.get(st, 0) + 1
    committed = sum(delta(i) for i in pull_ids)
    attestations = sent_b - sent_a
    if served is not None:
        polls, pull_rate = served_b - served_a, (served_b - served_a) / wall
    else:
        polls, pull_rate = committed, committed / (t_b - t_a)
    push_rate = attestations / wall
    cpu_rate = (cpu_b - cpu_a) / wall
    per = cpu_rate / (pull_rate + push_rate) if pull_rate + push_rate else None
    errors, first = sim_push.agent_errors(agents)
    return {
        "n": n_pull, "n_push": n_push, "mode": "both", "quote_interval": qi, "enrol_s": enrol_s,
        "attested_at_start": attested, "window_s": wall, "polls_span_s": t_b - t_a,
        "pull_polls": polls, "pull_polls_counted_by": "served" if served is not None else "committed",
        "pull_polls_committed": committed, "push_attestations": attestations,
        "push_passed": sum(delta(i) for i in push_ids),
        "pull_rate": pull_rate, "push_rate": push_rate,
        "target_rate": (n_pull + n_push) / qi, "achieved_rate": pull_rate + push_rate,
        "polls": polls + attestations, "cpu_s": cpu_b - cpu_a, "cpu_user_s": us_b[0] - us_a[0],
        "cpu_sys_s": us_b[1] - us_a[1], "cpu_per_s": cpu_rate, "cpu_per_poll": per,
        "agents_per_core_2s": 2.0 / per if per else None, "rss_mb": rss, "states": states,
        "latency_ms": sim_push.latency_ms(agents, w0, w0 + wall), "agent_errors": errors,
        "first_errors": first, "store": fleet.store_delta(store_a, store_b),
    }  # fmt: skip


def tls_client(ca_file: Path) -> Any:
    from keytrio.actors.common import tls

    return tls.client_context([ca_file])


def mixed_model(mixed: dict[str, Any], pull: dict[str, Any] | None, push: dict[str, Any] | None) -> dict[str, Any] | None:
    """The mixed verifier's CPU against what the same run's pull and push rows predict: its pull
    polls/s x the pull row's CPU per poll + its push attestations/s x the push row's CPU per
    attestation (CPU seconds per second of window); and the pull CPU per poll the mixed CPU implies
    if push attestations cost what they cost alone (``implied_pull_cpu_per_poll``)."""
    if not pull or not push or not pull.get("cpu_per_poll") or not push.get("cpu_per_poll"):
        return None
    pull_part = mixed["pull_rate"] * pull["cpu_per_poll"]
    push_part = mixed["push_rate"] * push["cpu_per_poll"]
    predicted = pull_part + push_part
    implied = (mixed["cpu_per_s"] - push_part) / mixed["pull_rate"] if mixed["pull_rate"] else None
    return {"predicted_cpu_per_s": predicted, "measured_cpu_per_s": mixed["cpu_per_s"],
            "measured_over_predicted": mixed["cpu_per_s"] / predicted if predicted else None,
            "pull_cpu_per_poll": pull["cpu_per_poll"], "push_cpu_per_attestation": push["cpu_per_poll"],
            "implied_pull_cpu_per_poll": implied,
            "implied_over_pull_row": implied / pull["cpu_per_poll"] if implied is not None else None}  # fmt: skip


def _mixed_side(args: argparse.Namespace, ca: Path, data_dir: Path, cpu: int, log: Any, ctx: Any, limits: Any,
                agents: list[dict[str, Any]], body: dict[str, Any], qi: float, sims: SimFleet, pushers: Any,
                registrar: str | None, report: dict[str, Any]) -> dict[str, Any] | None:
    """``--mixed``: a fresh keytrio verifier in mode = both (1 worker, SQLite, pinned to ``cpu``), the
    N pull agents of ``sims`` and N push agents of ``pushers`` together (mixed_window)."""
    n = len(agents)
    push, new = _push_agents(n, pushers)
    mport = fleet.free_port()

    async def side() -> dict[str, Any]:
        await _register_push(args, n, pushers, new, registrar)
        srv, url = fleet._start_keytrio(ca, data_dir, cpu, log, options={
            "quote_interval": qi, "mode": "both", "metrics_ip": "127.0.0.1", "metrics_port": mport})  # fmt: skip
        try:
            async with httpx.AsyncClient(verify=ctx, timeout=120.0, limits=limits) as admin:
                await fleet._upload(admin, url, body)
                await trio.sleep(0.5)
                served = sims.cpu()
                r = await mixed_window(admin, url, ca / "cacert.crt", lambda: [srv.pid], agents, push, qi,
                                       args.seconds, partial(fleet.store_counts, mport), args.enrol_concurrency,
                                       args.push_client == "lean", served=sims.quotes_served)  # fmt: skip
                return {**r, "agents_process_cpu_s": sims.cpu() - served}
        finally:
            _stop(srv)

    try:
        return trio.run(side)
    except (RuntimeError, httpx.HTTPError, OSError) as exc:
        report["stopped"]["mixed"] = f"N={n}: {exc}"
        return None


def _say_mixed(r: dict[str, Any]) -> None:
    st, m, lat = r.get("store") or {}, r.get("model"), r.get("latency_ms") or {}
    group = (st.get("mean_group") or {}).get("pull_group")
    commits, writes = st.get("commits") or {}, st.get("writes") or {}
    model = (f", {m['measured_over_predicted']:.2f}x the pull + push rows' prediction (pull CPU per poll implied "
             f"{m['implied_pull_cpu_per_poll'] * 1e3:.3f} ms vs {m['pull_cpu_per_poll'] * 1e3:.3f} ms)"
             if m and m.get("implied_pull_cpu_per_poll") is not None else "")
    print(f"[bench] sim keytrio mixed N={r['n']}+{r['n_push']} (interval {r['quote_interval']:g} s): "
          f"{r['pull_rate']:.1f} polls/s + {r['push_rate']:.1f} attestations/s, "
          f"{(r['cpu_per_poll'] or 0) * 1e3:.3f} ms verifier CPU per poll or attestation "
          f"(user {r['cpu_user_s']:.2f} s, sys {r['cpu_sys_s']:.2f} s in {r['window_s']:.1f} s){model}; "
          f"pull group {fleet._fmt(group, '.1f')} records per commit, commits background/urgent/mixed "
          f"{commits.get('background')}/{commits.get('urgent')}/{commits.get('mixed')}, writes background/urgent "
          f"{writes.get('background')}/{writes.get('urgent')}; push latency capabilities {lat.get('capabilities')} ms, "
          f"evidence {lat.get('evidence')} ms; {r['rss_mb']:.0f} MB", file=sys.stderr)


def _upstream_push_side(args: argparse.Namespace, up: Any, n: int, body: dict[str, Any], pushers: Any,
                        report: dict[str, Any]) -> dict[str, Any] | None:
    from bench import sim_push_upstream

    pushers.grow(n, salt="push")
    try:
        r = trio.run(sim_push_upstream.upstream_push_side, up, pushers.agents[:n], body, args.seconds, args.register)
    except (RuntimeError, httpx.HTTPError) as exc:
        report["stopped"]["upstream push"] = f"N={n}: {exc}"
        return None
    _say("upstream push", r)
    return r


def _say(name: str, r: dict[str, Any]) -> None:
    print(f"[bench] sim {name} N={r['n']} (interval {r['quote_interval']:g} s): {r['achieved_rate']:.1f}/"
          f"{r['target_rate']:.1f} polls/s, {(r['cpu_per_poll'] or 0) * 1e3:.3f} ms verifier CPU/poll "
          f"(user {r['cpu_user_s']:.2f} s, sys {r['cpu_sys_s']:.2f} s in {r['window_s']:.1f} s), "
          f"{r['agents_per_core_2s'] or 0:.0f} agents/core at 2 s, {r['rss_mb']:.0f} MB{_groups(r)}", file=sys.stderr)


def _groups(r: dict[str, Any]) -> str:
    st = r.get("store")
    if not st:
        return ""
    g = st["mean_group"]
    return (f", {st['commits']['all']} commits ({fleet._fmt(g['pull_group'], '.1f')} background, "
            f"{fleet._fmt(g['push_group'], '.1f')} urgent writes per commit holding any)")


def _label(name: str, r: dict[str, Any]) -> str:
    if name.startswith("upstream") and r.get("processes"):
        return f"{name} (max_workers {r.get('workers')}: {r['processes']} processes)"
    if name.startswith("keytrio") and r.get("workers", 1) > 1:
        return f"{name}: {r.get('processes')} processes"
    return name


def tables(rep: dict[str, Any]) -> str:
    rows = ["| N | side | quote interval | enrol s | target polls/s | achieved polls/s | "
            "verifier CPU per poll (user + sys) | its PostgreSQL backends' CPU per poll | agents per core at 2 s "
            "(with the backends) | verifier RSS MB | agents processes' CPU per poll | handshakes per poll | states at end |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rep["rows"]:
        for name, r in row.items():
            if not isinstance(r, dict) or "cpu_per_poll" not in r:
                continue
            cpp, per_agent = r["cpu_per_poll"], r.get("agents_process_cpu_per_poll")
            split = (f" ({r['cpu_user_s'] / r['polls'] * 1e3:.2f} + {r['cpu_sys_s'] / r['polls'] * 1e3:.2f})"
                     if r["polls"] and "cpu_user_s" in r else "")
            db = r.get("db_cpu_per_poll")
            with_db = f" ({fleet._fmt(r.get('agents_per_core_2s_with_db'), ',.0f')})" if db else ""
            rows.append(
                f"| {r['n']:,} | {_label(name, r)} | {r['quote_interval']:g} s | {fleet._fmt(r.get('enrol_s'), '.0f')} | "
                f"{r['target_rate']:.1f} | {r['achieved_rate']:.1f} | "
                f"{fleet._fmt(cpp and cpp * 1e3, '.3f')} ms{split} | {fleet._fmt(db and db * 1e3, '.3f')} ms | "
                f"{fleet._fmt(r.get('agents_per_core_2s'), ',.0f')}{with_db} | "
                f"{r['rss_mb']:.0f} | {fleet._fmt(per_agent and per_agent * 1e3, '.2f')} ms | "
                f"{fleet._fmt(r.get('handshakes_per_poll'), '.3f')} | {', '.join(f'{s}:{c}' for s, c in sorted(r['states'].items()))} |")
    stopped = "".join(f"\n- stopped: {name}: {why}" for name, why in rep["stopped"].items())
    stopped += "".join(f"\n- N={row['n']:,} {name}: {row[name]['polls']} evidence submissions accepted in the "
                       f"{row[name]['window_s']:.1f} s window, {row[name]['passed']} attestations passed over "
                       f"{row[name]['passed_span_s']:.1f} s around it; push agents' errors "
                       f"{row[name]['agent_errors'] or 'none'}"
                       for row in rep["rows"] for name in ("push", *PUSH_FLOORS.values(), "upstream push") if row.get(name))
    la0, la1 = rep["loadavg_start"], rep["loadavg_end"]
    return (f"### 4b. Simulated fleet (software RSA-2048 AKs, {rep['agent_procs']} agents process(es), {rep['policy_files']:,}-file "
            f"runtime policy, {rep['files_per_agent']} files + boot_aggregate per IMA log, {rep['seconds']:g} s "
            f"window; verifier pinned to CPU {rep['verifier_cpu']}, its database under {rep['verifier_dir']}; the first {rep['registered']:,} agents registered with keytrio's registrar; "
            f"load average {la0[0]:.1f} at start, {la1[0]:.1f} at end)\n\n" + "\n".join(rows) + stopped)


#: ``--push-floor`` kinds -> their rows' names
PUSH_FLOORS = {"full": "push floor", "bare": "push floor (bare)"}


def _floor_kinds(value: str) -> list[str]:
    kinds = [k for k in value.split(",") if k]
    if not kinds or set(kinds) - set(PUSH_FLOORS):
        raise argparse.ArgumentTypeError(f"expected full, bare or full,bare, not {value!r}")
    return kinds


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="1000,5000", help="comma-separated N values for keytrio's verifier")
    ap.add_argument("--seconds", type=float, default=30.0, help="measuring window per side and N")
    ap.add_argument("--quote-interval", type=float, default=None,
                    help=f"keytrio's quote_interval (default: max(2, N / {AUTO_RATE:g}) s)")
    ap.add_argument("--policy-files", type=int, default=10_000)
    ap.add_argument("--register", type=int, default=100,
                    help="how many agents register with keytrio's registrar first (0: none; all are enrolled)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU the verifier is pinned to, all its worker processes too (default: the last)")
    ap.add_argument("--agent-procs", type=int, default=1,
                    help="agents processes sharing out the fleet (process p: agents p, p + K, ...; own port, "
                         "loopback addresses and keys); they run on the CPUs other than --cpu")
    ap.add_argument("--enrol-concurrency", type=int, default=32, help="enrolment POSTs in flight at once")
    ap.add_argument("--workers", default="1",
                    help="comma-separated keytrio rows by worker processes ([verifier] workers), e.g. 1,2; "
                         "more than 1 runs on PostgreSQL (a fresh database per row)")
    ap.add_argument("--database", choices=("auto", "postgresql"), default="auto",
                    help="auto: 1 worker on SQLite, N on PostgreSQL; postgresql: every row on PostgreSQL")
    ap.add_argument("--pg-url", default=None,
                    help="admin URL of a PostgreSQL server (a role that may create databases); default "
                         "$KEYTRIO_TEST_PG_URL or the local server, started if down (testbed/postgres.py)")
    ap.add_argument("--verifier-dir", default=None,
                    help="where keytrio's verifier keeps its SQLite database (default: the system's temporary "
                         "directory; /dev/shm takes fsync latency out of enrolment, not CPU out of a poll)")
    ap.add_argument("--push", action="store_true",
                    help="also a push-mode fleet (bench.sim_push: v3.0 agents in this process) per N, against a "
                         "fresh keytrio verifier in mode = push, next to the pull row")
    ap.add_argument("--pull-floor", action="store_true",
                    help="the pull agents also polled by bench.floor_pull (the poll's floor, a minimal poller, not "
                         "a verifier): a 'pull floor' row per N (docs/performance.md 4c.15)")
    ap.add_argument("--push-floor", default=None, type=_floor_kinds,
                    help="with --push: the push agents also drive bench.floor_push (the push cycle's floor, a "
                         "minimal v3.0 server, not a verifier): 'full' (a 'push floor' row), 'bare' (a 'push floor "
                         "(bare)' row: the wire alone) or 'full,bare' (docs/performance.md 4c.15)")
    ap.add_argument("--mixed", action="store_true",
                    help="also a mode = both row per N: a fresh keytrio verifier (1 worker, SQLite) driven by the "
                         "N pull agents and N push agents together; its CPU per (poll + attestation), the store's "
                         "group commits (pull group size, urgent/background writes from its /metrics) and, with "
                         "--push, the CPU the pull and push rows predict. Every 1-worker keytrio row then serves "
                         "/metrics and reports its store counts")
    ap.add_argument("--push-client", choices=("lean", "httpx"), default="lean",
                    help="the push agents' HTTP client against keytrio's push verifier: lean (a kept "
                         "RawConn per agent, as lean as the pull agents' side) or httpx (before 2026-12-04: "
                         "the controller's CPU per attestation slowed the agents, see docs/performance.md 4c.3)")
    ap.add_argument("--upstream-dir", type=Path, default=None, help="a DIR running tests/interop/upstream/up.sh")
    ap.add_argument("--upstream-push-dir", type=Path, default=None,
                    help="with --push: a DIR running up.sh in push mode (bench.sim_push_upstream.UP_ENV); the same "
                         "push agents drive it at --upstream-sizes")
    ap.add_argument("--upstream-sizes", default="50", help="N values for upstream's verifier")
    ap.add_argument("--py-spy", default=None, help="sample keytrio's verifier during the window (py-spy raw)")
    ap.add_argument("--py-spy-of", choices=("pull", "push"), default="pull",
                    help="which keytrio verifier --py-spy samples: the pull row's (rate 100, every worker) or, "
                         "with --push, the push row's (--gil, rate 300, as docs/performance.md 4c.7; fold it with "
                         "python -m bench.sim_profile FILE --push)")
    ap.add_argument("--cprofile", default=None, help="run keytrio's verifier under cProfile into this file")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.push_floor and not args.push:
        ap.error("--push-floor needs --push (the floors are driven by the push row's agents)")
    report = run(args)
    print(tables(report))
    return 1 if report["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
