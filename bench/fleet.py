"""Benchmark 4: one verifier monitoring N agents, keytrio's vs upstream's (up.sh instance).

Agents: ``python -m bench.fleet agents DIR CV_CA_DIR`` is one process running many testbed
machines (testbed.machine.Machine: own swtpm on a unix socket, boot log extended into PCRs 0-7,
an IMA log, keytrio's agent with an ECC P-384 EK and its own ECC P-256 AK, PCR 16 bound to its
own NK). Only one swtpm is provisioned (swtpm_setup); every machine gets a copy of that state dir,
so each swtpm is its own TPM with its own PCRs (identical EKs: fine for a verifier benchmark). Each
machine measures ``FILES_PER_AGENT`` files of the shared runtime policy (bench.gen.entry_for), so
its IMA log is covered by the policy. The agents trust upstream's ``cacert.crt``, whose
``client-cert.crt`` both verifiers present (bench.keytrio_server uses upstream's cv_ca).

Verifiers, pinned to ``cpu`` (the agents process and this controller run on the other CPUs):
- keytrio: a fresh ``bench.keytrio_server`` process (SQLite) per N;
- upstream: the up.sh verifier (all processes of its process group are measured together).
Both get the same named runtime policy (``policy_files`` files, uploaded once per verifier) and
the same enrolment JSON (the fields upstream's tenant POSTs; V random, no payload).

Per side and N: enrol N agents, wait until each has one attestation (+ one quote interval), then
a window of ``seconds``: process CPU time (utime+stime of /proc/PID/stat), VmRSS, and per-agent
``attestation_count`` from ``GET /v2.1/agents/?bulk`` at both ends. Achieved polls/s = sum over
agents of count delta / that agent's window; CPU per poll = CPU seconds per second / polls per
second. RSS per agent = (RSS with N agents - RSS with 0 agents and the policy loaded) / N. Then the
agents are deleted (upstream) or the verifier stopped (keytrio). Sides alternate per N.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

POLICY_NAME = "bench-fleet"
FILES_PER_AGENT = 5
TPM_POLICY = json.dumps({"mask": hex(1 << 10)})  # PCR 10 (IMA); PCR 16 is always checked
RSS_LIMIT_MB = 8192  # stop a side before it takes the shared machine down
API = "2.1"


# --- the agents process ---------------------------------------------------------------------------------


class Fleet:
    """N testbed machines in one trio process; grown on request."""

    def __init__(self, root: Path, ca_dir: Path, policy_files: int) -> None:
        from keytrio.testbed.pki import CaFiles

        self.root = root
        self.ca = CaFiles(ca_dir)
        self.policy_files = policy_files
        self.machines: list[Any] = []
        self.template = root / "template"

    async def grow(self, nursery: trio.Nursery, n: int) -> list[dict[str, Any]]:
        from keytrio.testbed.machine import Machine
        from keytrio.testbed.swtpm_state import copy_state, provision

        if not self.machines:
            await trio.to_thread.run_sync(lambda: provision(self.template, banks=("sha1", "sha256")))
        limiter = trio.CapacityLimiter(4)  # starts at once: TPM + key generation are CPU work
        new = []
        for i in range(len(self.machines), n):
            name = f"a{i}"
            await trio.to_thread.run_sync(copy_state, self.template, self.root / "machines" / name / "tpm")
            agent_id = str(uuidlib.UUID(int=random.Random(f"fleet:{i}").getrandbits(128), version=4))
            new.append(Machine(name, self.root / "machines", self.ca, uuid=agent_id, tpm_encryption_alg="ecc",
                               tpm_signing_alg="ecdsa", metrics_port=-1, secure_mount="never"))

        async def start(index: int, m: Any) -> None:
            from bench import gen

            async with limiter:
                await nursery.start(m.run)
                for j in range(FILES_PER_AGENT):
                    e = gen.entry_for((index * FILES_PER_AGENT + j) % self.policy_files)
                    await m.measure(e.path, f"file {(index * FILES_PER_AGENT + j) % self.policy_files}".encode())

        async with trio.open_nursery() as starting:
            for k, m in enumerate(new):
                starting.start_soon(start, len(self.machines) + k, m)
        self.machines += new
        return [self.describe(m) for m in self.machines]

    @staticmethod
    def describe(m: Any) -> dict[str, Any]:
        info = m.info
        return {"id": info.agent_id, "ip": info.address[0], "port": info.address[1],
                "ak_tpm": base64.b64encode(info.ak_public).decode(), "mtls_cert": info.mtls_cert,
                "boot_aggregate": m.ima.entries[0].digest.hex()}  # fmt: skip


async def agents_main(root: Path, ca_dir: Path, policy_files: int) -> None:
    fleet = Fleet(root, ca_dir, policy_files)
    async with trio.open_nursery() as nursery:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "grow":
                t0 = time.monotonic()
                agents = await fleet.grow(nursery, int(cmd["n"]))
                print(json.dumps({"agents": agents, "seconds": time.monotonic() - t0}), flush=True)
        nursery.cancel_scope.cancel()


class ChildProcess:
    """A bench child process driven by JSON lines over stdin/stdout (stderr to ``log``), pinned to ``cpus``."""

    label = "child"

    def __init__(self, argv: list[str], env: dict[str, str], cpus: set[int], log: Path) -> None:
        self._log = open(log, "w")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1, env={**os.environ, **env}, preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )  # fmt: skip

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} process exited; see {self.log}:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Agents(ChildProcess):
    """The controller's handle on the swtpm agents process."""

    label = "fleet agents"

    def __init__(self, root: Path, ca_dir: Path, policy_files: int, cpus: set[int], log: Path) -> None:
        super().__init__(
            ["-m", "bench.fleet", "agents", str(root), str(ca_dir), str(policy_files)],
            {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TSS2_LOG": "all+NONE"}, cpus, log,
        )
        self._read()

    def grow(self, n: int) -> dict[str, Any]:
        return self.send({"op": "grow", "n": n})


# --- process accounting ----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int]:
    """(pgid, utime+stime in clock ticks) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[2]), int(fields[11]) + int(fields[12])


def _user_sys(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds summed over ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return user / tick, system / tick


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _status_kb(pid: int, *keys: str) -> dict[str, int]:
    """Fields of /proc/PID/status in KB (VmRSS = RssAnon + RssFile + RssShmem)."""
    out = dict.fromkeys(keys, 0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in out:
            out[k] = int(v.split()[0])
    return out


def group_pids(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _stat(int(entry.name))[0] == pgid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (keytrio's supervisor and its workers: each worker runs in
    a session of its own, so the process group does not find them; the parent links do)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def usage(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds, RSS MB) summed over ``pids`` (upstream's verifier is several processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = rss = 0
    for pid in pids:
        try:
            cpu += _stat(pid)[1]
            rss += _rss_kb(pid)
        except (OSError, ValueError, IndexError):
            continue
    return cpu / tick, rss / 1024


# --- talking to a verifier --------------------------------------------------------------------------------


def policy_body(policy_files: int, boot_aggregates: set[str]) -> dict[str, Any]:
    from bench import gen

    doc = gen.policy_doc([gen.entry_for(i) for i in range(policy_files)])
    doc["digests"]["boot_aggregate"] = sorted(boot_aggregates)
    raw = json.dumps(doc).encode()
    return {"runtime_policy": base64.b64encode(raw).decode(), "runtime_policy_key": "", "tpm_policy": TPM_POLICY}


def enrolment(agent: dict[str, Any]) -> dict[str, Any]:
    """What upstream's tenant POSTs to /v2.x/agents/{id} (actors/tenant/add.py builds the same)."""
    return {
        "v": base64.b64encode(os.urandom(32)).decode(), "cloudagent_ip": agent["ip"],
        "cloudagent_port": agent["port"], "tpm_policy": TPM_POLICY, "runtime_policy": "",
        "runtime_policy_name": POLICY_NAME, "runtime_policy_key": "", "mb_policy": None, "mb_policy_name": None,
        "ima_sign_verification_keys": "", "metadata": "{}", "revocation_key": "",
        "accept_tpm_hash_algs": ["sha256", "sha384", "sha512"], "accept_tpm_encryption_algs": ["ecc", "rsa"],
        "accept_tpm_signing_algs": ["ecdsa", "rsassa"], "ak_tpm": agent["ak_tpm"], "mtls_cert": agent["mtls_cert"],
        "supported_version": API,
    }  # fmt: skip


async def _each(jobs: list[Any], fn: Any, concurrency: int = 8) -> list[Any]:
    out: list[Any] = [None] * len(jobs)
    it = iter(enumerate(jobs))

    async def worker() -> None:
        for i, job in it:
            out[i] = await fn(job)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return out


async def _bulk(client: httpx.AsyncClient, url: str) -> tuple[float, dict[str, Any]]:
    r = await client.get(f"{url}/v{API}/agents/", params={"verifier": "", "bulk": "1"})
    r.raise_for_status()
    return time.monotonic(), r.json()["results"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child's listener: the bench reads its /metrics)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: the store counters of keytrio's verifier on /metrics (actors/verifier/metrics.py)
STORE_COUNTERS = ("keytrio_verifier_store_commits_total", "keytrio_verifier_store_writes_total")


async def store_counts(port: int) -> dict[str, float]:
    """The store's group-commit counters from keytrio's verifier's ``GET /metrics`` on ``port``:
    ``{"commits background": n, "commits urgent": n, "commits mixed": n, "writes background": n,
    "writes urgent": n}``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=30.0) as c:
        r = await c.get(f"http://127.0.0.1:{port}/metrics")
    r.raise_for_status()
    return {f"{s.name.split('_')[3]} {s.labels['kind']}": s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples if s.name in STORE_COUNTERS}  # fmt: skip


def store_delta(a: dict[str, float] | None, b: dict[str, float] | None) -> dict[str, Any] | None:
    """What the store committed between two :func:`store_counts`: group commits by what they held
    (background, urgent, mixed), writes by kind, and the mean groups: background writes per commit
    holding any (the pull monitors' records: ``pull_group``), urgent writes per commit holding any
    (``push_group``), writes per commit (``all``)."""
    if a is None or b is None:
        return None
    d = {k: int(b[k] - a[k]) for k in b}
    bg, urgent, mixed = d["commits background"], d["commits urgent"], d["commits mixed"]
    wb, wu = d["writes background"], d["writes urgent"]
    commits = bg + urgent + mixed
    return {"commits": {"background": bg, "urgent": urgent, "mixed": mixed, "all": commits},
            "writes": {"background": wb, "urgent": wu},
            "mean_group": {"pull_group": wb / (bg + mixed) if bg + mixed else None,
                           "push_group": wu / (urgent + mixed) if urgent + mixed else None,
                           "all": (wb + wu) / commits if commits else None}}  # fmt: skip


async def wait_attested(client: httpx.AsyncClient, url: str, ids: list[str], *, pause: float = 1.0,
                        bulk: Callable[[httpx.AsyncClient, str], Awaitable[tuple[float, dict[str, Any]]]] | None = None,
                        ) -> int:
    """Warm-up: bulk GETs ``pause`` s apart until every agent of ``ids`` was attested once (its
    ``attestation_count`` >= 1), for at most 30 s + 0.2 s per agent; returns how many were."""
    bulk = bulk or _bulk
    deadline = time.monotonic() + 30 + 0.2 * len(ids)
    attested = 0
    while time.monotonic() < deadline:
        _t, recs = await bulk(client, url)
        attested = sum(1 for i in ids if recs.get(i, {}).get("attestation_count", 0) >= 1)
        if attested == len(ids):
            break
        await trio.sleep(pause)
    return attested


async def _window(client: httpx.AsyncClient, url: str, agents: list[dict[str, Any]], pids: Any, interval: float,
                  seconds: float, rss0: float, on_window: Any = None, concurrency: int = 8,
                  side_pids: Any = None, counts: Any = None, served: Any = None) -> dict[str, Any]:
    """Enrol ``agents`` (``concurrency`` POSTs at a time), warm up, measure one window; -> the row of
    the table for one side.

    ``on_window()`` (optional) is called as the window opens (bench.fleet keytrio --py-spy).
    ``side_pids()`` (optional): processes working for the verifier but not part of it (its
    PostgreSQL backends), whose CPU in the window is reported apart as ``side_cpu_s``.
    ``counts()`` (optional, async: :func:`store_counts`) is read just before and just after the
    window: the store's group commits in it (:func:`store_delta`) are the row's ``store``.
    ``served()`` (optional: the quotes the agents have served so far, bench.sim_fleet's simulated
    agents) is read right next to the CPU at both ends: the polls are then those served in the CPU's
    own window. Without it the polls are Σ ``attestation_count`` deltas of the bulk GETs around the
    window, which count each agent's polls in whole cycles: an agent polled 14 or 15 times in a 30 s
    window of 2.07 s cycles, and a fleet enrolled within a second polls in step, so the count moved
    by up to one cycle in 14.5 (±3.5 %) with where the window's ends fell, and the store's commit
    lag moved those ends (docs/performance.md 4c.13). Both counts are in the row."""
    ids = [a["id"] for a in agents]
    n = len(ids)

    async def enrol(a: dict[str, Any]) -> int:
        r = await client.post(f"{url}/v{API}/agents/{a['id']}", json=enrolment(a))
        return r.status_code

    t0 = time.monotonic()
    statuses = await _each(agents, enrol, concurrency)
    refused = [s for s in statuses if s != 200]
    if refused:
        raise RuntimeError(f"{url}: {len(refused)} of {n} enrolments refused (statuses {sorted(set(refused))})")
    enrol_s = time.monotonic() - t0
    # warm-up: every agent attested once (first poll: the whole IMA log + V), then one more interval
    # a bulk GET of thousands of agents is verifier CPU too: fewer of them for a large fleet
    attested = await wait_attested(client, url, ids, pause=max(1.0, n / 500))
    warm_s = time.monotonic() - t0
    await trio.sleep(interval)
    t_a, before = await _bulk(client, url)
    if on_window is not None:
        on_window()
    store_a = await counts() if counts is not None else None
    served_a = served() if served is not None else 0
    cpu_a, _rss = usage(pids())
    us_a = _user_sys(pids())
    side_a = usage(side_pids())[0] if side_pids else 0.0
    w0 = time.monotonic()
    rss_peak = 0.0
    while time.monotonic() - w0 < seconds:
        await trio.sleep(min(2.0, seconds))
        rss_peak = max(rss_peak, usage(pids())[1])
    cpu_b, rss = usage(pids())
    us_b = _user_sys(pids())
    served_b = served() if served is not None else 0
    side_b = usage(side_pids())[0] if side_pids else 0.0
    wall = time.monotonic() - w0
    store_b = await counts() if counts is not None else None
    t_b, after = await _bulk(client, url)
    committed = 0
    states: dict[str, int] = {}
    for i in ids:
        a, b = before.get(i, {}), after.get(i, {})
        committed += b.get("attestation_count", 0) - a.get("attestation_count", 0)
        st = str(b.get("operational_state"))
        states[st] = states.get(st, 0) + 1
    if served is not None:
        polls, rate = served_b - served_a, (served_b - served_a) / wall
    else:
        polls, rate = committed, committed / (t_b - t_a)
    cpu_rate = (cpu_b - cpu_a) / wall
    return {
        "n": n, "target_rate": n / interval, "achieved_rate": rate, "polls": polls, "window_s": wall,
        "polls_counted_by": "served" if served is not None else "committed",
        "polls_committed": committed, "polls_committed_span_s": t_b - t_a,
        "cpu_s": cpu_b - cpu_a, "cpu_user_s": us_b[0] - us_a[0], "cpu_sys_s": us_b[1] - us_a[1], "cpu_per_s": cpu_rate, "cpu_per_poll": cpu_rate / rate if rate else None,
        "rss_mb": rss, "rss_peak_mb": max(rss_peak, rss), "rss0_mb": rss0,
        "rss_per_agent_kb": (rss - rss0) * 1024 / n, "attested_at_start": attested, "states": states,
        "enrol_s": enrol_s, "warmup_s": warm_s, "side_cpu_s": side_b - side_a, "processes": len(pids()),
        "store": store_delta(store_a, store_b),
    }  # fmt: skip


async def _delete_all(client: httpx.AsyncClient, url: str, ids: list[str], timeout: float) -> bool:
    async def delete(i: str) -> int:
        return (await client.delete(f"{url}/v{API}/agents/{i}")).status_code

    await _each(ids, delete)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _t, recs = await _bulk(client, url)
        if not any(i in recs for i in ids):
            return True
        await trio.sleep(1.0)
    return False


async def _upload(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    r = await client.post(f"{url}/v{API}/allowlists/{POLICY_NAME}", json=body)
    if r.status_code == 409:  # already there (an earlier run against the same instance)
        r = await client.put(f"{url}/v{API}/allowlists/{POLICY_NAME}", json=body)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"{url}: runtime policy upload answered {r.status_code}: {r.text[:300]}")


def start_child(argv: list[str], cpus: set[int], log: Any, what: str, ready: str = "PORT ") -> tuple[subprocess.Popen[str], int]:
    """``python *argv`` (this tree on its path) pinned to ``cpus``, its stderr to ``log``; waits for
    its first stdout line ``<ready><port> ...`` -> (the process, the port)."""
    srv = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )  # fmt: skip
    assert srv.stdout is not None
    line = srv.stdout.readline()
    if not line.startswith(ready):
        srv.kill()
        raise RuntimeError(f"{what} did not start: {line!r}")
    return srv, int(line.split()[1])


def stop_child(srv: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    srv.terminate()
    try:
        srv.wait(timeout=30)
    except subprocess.TimeoutExpired:
        srv.kill()
        srv.wait()


def _start_keytrio(ca: Path, data_dir: Path, cpu: int, log: Any, cprofile: str | None = None,
                   options: dict[str, Any] | None = None) -> tuple[subprocess.Popen[str], str]:
    prof = ["-m", "cProfile", "-o", cprofile] if cprofile else []  # written at exit (stop it with SIGINT)
    extra = [json.dumps(options)] if options else []
    srv, port = start_child([*prof, "-m", "bench.keytrio_server", str(ca), str(data_dir), *extra], {cpu}, log,
                            "keytrio verifier")
    return srv, f"https://127.0.0.1:{port}"


def _upstream_interval(up_dir: Path) -> float:
    for line in (up_dir / "conf" / "verifier.conf").read_text().splitlines():
        if line.startswith("quote_interval"):
            return float(line.split("=", 1)[1])
    return 2.0


def run(args: argparse.Namespace, cpu: int) -> dict[str, Any]:
    from bench.http_load import _env_sh, pin_group
    from keytrio.actors.common import tls

    up_dir: Path = args.upstream_dir
    env = _env_sh(up_dir)
    ca = Path(env["KL_CA_DIR"])
    up_pgid = int((up_dir / "run" / "verifier.pid").read_text().strip())
    pin_group(up_pgid, cpu)
    others = set(os.sched_getaffinity(0)) - {cpu} or {cpu}
    os.sched_setaffinity(0, others)
    sizes = [int(s) for s in str(args.fleet_sizes).split(",") if s]
    intervals = {"keytrio": 2.0, "upstream": _upstream_interval(up_dir)}  # keytrio_server: quote_interval 2
    report: dict[str, Any] = {"sizes": sizes, "seconds": args.fleet_seconds, "policy_files": args.fleet_policy_files,
                              "files_per_agent": FILES_PER_AGENT, "quote_interval": intervals, "verifier_cpu": cpu,
                              "agents_cpus": sorted(others), "rows": [], "stopped": {}}  # fmt: skip
    ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-fleet-") as tmp, \
            open(Path(args.out) / "fleet-keytrio-verifier.log", "w") as klog:
        agents = Agents(Path(tmp) / "agents", ca, args.fleet_policy_files, others, Path(args.out) / "fleet-agents.log")
        try:
            up_base: dict[str, float] = {}

            async def side(name: str, fleet: list[dict[str, Any]], body: dict[str, Any], k: int) -> dict[str, Any]:
                async with httpx.AsyncClient(verify=ctx, timeout=60.0, limits=limits) as client:
                    if name == "keytrio":
                        srv, url = _start_keytrio(ca, Path(tmp) / f"verifier-{k}", cpu, klog)
                        try:
                            await _upload(client, url, body)
                            await trio.sleep(0.5)
                            rss0 = usage([srv.pid])[1]
                            return await _window(client, url, fleet, lambda: [srv.pid], intervals[name],
                                                 args.fleet_seconds, rss0)
                        finally:
                            srv.terminate()
                            srv.wait(timeout=30)
                    url = env["KL_VERIFIER_URL"]
                    if not up_base:
                        await _upload(client, url, body)
                        await trio.sleep(0.5)
                        up_base["rss0"] = usage(group_pids(up_pgid))[1]
                    try:
                        return await _window(client, url, fleet, lambda: group_pids(up_pgid), intervals[name],
                                             args.fleet_seconds, up_base["rss0"])
                    finally:
                        gone = await _delete_all(client, url, [a["id"] for a in fleet], timeout=60 + 0.2 * len(fleet))
                        if not gone:
                            report["stopped"]["upstream"] = f"agents of N={len(fleet)} not deleted within the timeout"

            for k, n in enumerate(sizes):
                t0 = time.monotonic()
                try:
                    grown = agents.grow(n)
                except RuntimeError as exc:
                    report["stopped"]["agents"] = f"could not start {n} agents: {exc}"
                    break
                fleet = grown["agents"][:n]
                print(f"[bench] fleet: {n} agents up in {time.monotonic() - t0:.0f}s", file=sys.stderr)
                body = policy_body(args.fleet_policy_files, {a["boot_aggregate"] for a in fleet})
                row: dict[str, Any] = {"n": n, "agents_start_s": grown["seconds"], "loadavg": os.getloadavg()}
                for name in (["keytrio", "upstream"] if k % 2 == 0 else ["upstream", "keytrio"]):
                    if name in report["stopped"]:
                        continue
                    try:
                        row[name] = trio.run(side, name, fleet, body, k)
                    except (RuntimeError, httpx.HTTPError) as exc:
                        report["stopped"][name] = f"N={n}: {exc}"
                        continue
                    r = row[name]
                    print(f"[bench] fleet {name} N={n}: {r['achieved_rate']:.1f}/{r['target_rate']:.1f} polls/s, "
                          f"{(r['cpu_per_poll'] or 0) * 1e3:.2f} ms CPU/poll, {r['rss_mb']:.0f} MB", file=sys.stderr)
                    if r["rss_peak_mb"] > RSS_LIMIT_MB:
                        report["stopped"][name] = f"N={n}: RSS {r['rss_peak_mb']:.0f} MB > {RSS_LIMIT_MB} MB"
                report["rows"].append(row)
        finally:
            agents.close()
            os.sched_setaffinity(0, others | {cpu})
    return report


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def tables(fleet: dict[str, Any]) -> str:
    rows = ["| N | side | target polls/s | achieved polls/s | verifier CPU per poll | verifier RSS MB | "
            "RSS per agent KB | states at end |", "|---|---|---|---|---|---|---|---|"]
    for row in fleet["rows"]:
        for name in ("keytrio", "upstream"):
            r = row.get(name)
            if r is None:
                rows.append(f"| {row['n']} | {name} | — | not measured | | | | |")
                continue
            cpp = r["cpu_per_poll"]
            rows.append(f"| {r['n']} | {name} | {r['target_rate']:.1f} | {r['achieved_rate']:.1f} | "
                        f"{_fmt(cpp and cpp * 1e3, '.2f')} ms | {r['rss_mb']:.0f} | {r['rss_per_agent_kb']:.0f} | "
                        f"{', '.join(f'{s}:{c}' for s, c in sorted(r['states'].items()))} |")
        k, u = row.get("keytrio"), row.get("upstream")
        if k and u and k["cpu_per_poll"] and u["cpu_per_poll"]:
            rows.append(f"| {row['n']} | keytrio/upstream | | {k['achieved_rate'] / u['achieved_rate']:.2f} | "
                        f"{k['cpu_per_poll'] / u['cpu_per_poll']:.3f} | {k['rss_mb'] / u['rss_mb']:.3f} | "
                        f"{k['rss_per_agent_kb'] / u['rss_per_agent_kb'] if u['rss_per_agent_kb'] else float('nan'):.3f}"
                        " | |")
    stopped = "".join(f"\n- stopped: {name}: {why}" for name, why in fleet["stopped"].items())
    qi = fleet["quote_interval"]
    return (f"### 4. Fleet (one verifier, N agents each with its own swtpm, ECC P-256 AKs, quote_interval "
            f"{qi['keytrio']:g} s keytrio / {qi.get('upstream', 0):g} s upstream, shared {fleet['policy_files']:,}-file "
            f"runtime policy, {fleet['files_per_agent']} files + boot_aggregate per IMA log, "
            f"{fleet['seconds']:g} s window; verifier pinned to CPU {fleet['verifier_cpu']})\n\n"
            + "\n".join(rows) + stopped)


# --- keytrio only (profiling) -----------------------------------------------------------------------------


def run_keytrio_only(args: argparse.Namespace) -> dict[str, Any]:
    """keytrio's side alone (no up.sh instance): a fresh testbed CA, the agents, one verifier per N.

    With ``--py-spy FILE`` the verifier is also sampled by py-spy (``record --format raw``) during
    the window; the CPU figures of such a run include py-spy's interruptions, so measure without.
    """
    from keytrio.actors.common import tls
    from keytrio.testbed.pki import make_cv_ca

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    others = set(os.sched_getaffinity(0)) - {cpu} or {cpu}
    os.sched_setaffinity(0, others)
    sizes = [int(s) for s in str(args.sizes).split(",") if s]
    report: dict[str, Any] = {"sizes": sizes, "seconds": args.seconds, "policy_files": args.policy_files,
                              "files_per_agent": FILES_PER_AGENT, "quote_interval": {"keytrio": 2.0},
                              "verifier_cpu": cpu, "agents_cpus": sorted(others), "rows": [], "stopped": {}}
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-fleet-") as tmp, \
            open(out / "fleet-keytrio-verifier.log", "w") as klog:
        ca = make_cv_ca(Path(tmp) / "cv_ca").dir
        ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        agents = Agents(Path(tmp) / "agents", ca, args.policy_files, others, out / "fleet-agents.log")
        try:
            for k, n in enumerate(sizes):
                fleet = agents.grow(n)["agents"][:n]
                print(f"[bench] fleet: {n} agents up", file=sys.stderr)
                body = policy_body(args.policy_files, {a["boot_aggregate"] for a in fleet})

                async def side(fleet: list[dict[str, Any]] = fleet, body: dict[str, Any] = body,
                               k: int = k) -> dict[str, Any]:
                    async with httpx.AsyncClient(verify=ctx, timeout=60.0, limits=limits) as client:
                        srv, url = _start_keytrio(ca, Path(tmp) / f"verifier-{k}", cpu, klog, args.cprofile)
                        spy: list[subprocess.Popen[bytes]] = []

                        def start_spy() -> None:
                            if args.py_spy:
                                spy.append(subprocess.Popen(
                                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(srv.pid),
                                     "--format", "raw", "--rate", "200", "-d", str(int(args.seconds)),
                                     "-o", args.py_spy, *args.py_spy_args.split(),
                                     # --native needs to pause the process per sample
                                     *([] if "--native" in args.py_spy_args else ["--nonblocking"])],
                                    stdout=klog, stderr=klog))

                        try:
                            await _upload(client, url, body)
                            await trio.sleep(0.5)
                            rss0 = usage([srv.pid])[1]
                            return await _window(client, url, fleet, lambda: [srv.pid], 2.0, args.seconds, rss0,
                                                 on_window=start_spy)
                        finally:
                            for p in spy:
                                p.wait()
                            if args.cprofile:
                                srv.send_signal(signal.SIGINT)  # KeyboardInterrupt: cProfile writes its file
                                try:
                                    srv.wait(timeout=30)
                                except subprocess.TimeoutExpired:
                                    pass
                            srv.terminate()
                            srv.wait(timeout=30)

                r = trio.run(side)
                report["rows"].append({"n": n, "keytrio": r, "loadavg": os.getloadavg()})
                print(f"[bench] fleet keytrio N={n}: {r['achieved_rate']:.1f}/{r['target_rate']:.1f} polls/s, "
                      f"{(r['cpu_per_poll'] or 0) * 1e3:.3f} ms CPU/poll ({r['cpu_s']:.2f} CPU s in "
                      f"{r['window_s']:.1f} s; user {r['cpu_user_s']:.2f} s, sys {r['cpu_sys_s']:.2f} s), {r['rss_mb']:.0f} MB",
                      file=sys.stderr)
        finally:
            agents.close()
            os.sched_setaffinity(0, others | {cpu})
    (out / "fleet.json").write_text(json.dumps(report, indent=1))
    return report


# --- soak: RSS over time -------------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """keytrio's verifier with N agents for ``minutes``: VmRSS (/proc/PID/status) and the polls done
    every ``sample`` seconds; the RSS slope over the samples after ``warmup`` minutes (least squares),
    in KB/min and KB/min per agent. Enrolment and each agent's first (whole-log) poll come first.
    """
    from keytrio.actors.common import tls
    from keytrio.testbed.pki import make_cv_ca

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    others = set(os.sched_getaffinity(0)) - {cpu} or {cpu}
    os.sched_setaffinity(0, others)
    n = args.agents
    report: dict[str, Any] = {"agents": n, "minutes": args.minutes, "warmup_minutes": args.warmup,
                              "sample_s": args.sample, "quote_interval": args.quote_interval,
                              "policy_files": args.policy_files, "files_per_agent": FILES_PER_AGENT,
                              "verifier_cpu": cpu, "agents_cpus": sorted(others), "samples": []}
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-soak-") as tmp, \
            open(out / "soak-keytrio-verifier.log", "w") as klog:
        ca = make_cv_ca(Path(tmp) / "cv_ca").dir
        ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        agents = Agents(Path(tmp) / "agents", ca, args.policy_files, others, out / "soak-agents.log")
        try:
            fleet = agents.grow(n)["agents"][:n]
            print(f"[bench] soak: {n} agents up", file=sys.stderr)
            body = policy_body(args.policy_files, {a["boot_aggregate"] for a in fleet})

            async def soak() -> None:
                async with httpx.AsyncClient(verify=ctx, timeout=60.0, limits=limits) as client:
                    srv, url = _start_keytrio(ca, Path(tmp) / "verifier", cpu, klog,
                                              options={"quote_interval": args.quote_interval})
                    try:
                        await _upload(client, url, body)
                        report["rss_empty_kb"] = _rss_kb(srv.pid)
                        statuses = await _each(fleet, lambda a: _enrol_one(client, url, a))
                        if any(st != 200 for st in statuses):
                            raise RuntimeError(f"enrolments refused: {sorted(set(statuses))}")
                        t0 = time.monotonic()
                        cpu0 = usage([srv.pid])[0]
                        end = t0 + args.minutes * 60
                        while True:
                            _t, recs = await _bulk(client, url)
                            t = time.monotonic() - t0
                            states: dict[str, int] = {}
                            for a in fleet:
                                st = str(recs.get(a["id"], {}).get("operational_state"))
                                states[st] = states.get(st, 0) + 1
                            polls = sum(recs.get(a["id"], {}).get("attestation_count", 0) for a in fleet)
                            mem = _status_kb(srv.pid, "VmRSS", "RssAnon", "RssFile", "RssShmem")
                            sample = {"t_s": t, "rss_kb": mem["VmRSS"], "anon_kb": mem["RssAnon"],
                                      "file_kb": mem["RssFile"] + mem["RssShmem"], "polls": polls,
                                      "states": states, "cpu_s": usage([srv.pid])[0] - cpu0}
                            report["samples"].append(sample)
                            print(f"[bench] soak t={t:6.0f}s RSS {sample['rss_kb'] / 1024:7.1f} MB polls {polls}",
                                  file=sys.stderr)
                            if time.monotonic() >= end:
                                break
                            await trio.sleep(min(args.sample, max(end - time.monotonic(), 0.0)))
                    finally:
                        srv.terminate()
                        srv.wait(timeout=30)

            trio.run(soak)
        finally:
            agents.close()
            os.sched_setaffinity(0, others | {cpu})
    late = [s for s in report["samples"] if s["t_s"] >= args.warmup * 60]
    after = [(s["t_s"] / 60, s["rss_kb"]) for s in late]
    kb_min = slope(after)
    report["slope_kb_per_min"] = kb_min
    report["slope_kb_per_min_per_agent"] = kb_min / n
    report["anon_slope_kb_per_min"] = slope([(s["t_s"] / 60, s["anon_kb"]) for s in late])
    report["file_slope_kb_per_min"] = slope([(s["t_s"] / 60, s["file_kb"]) for s in late])
    if len(after) >= 2:
        polls = [s["polls"] for s in report["samples"] if s["t_s"] >= args.warmup * 60]
        report["polls_after_warmup"] = polls[-1] - polls[0]
        report["rss_after_warmup_kb"] = (min(r for _, r in after), max(r for _, r in after))
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    return report


async def _enrol_one(client: httpx.AsyncClient, url: str, agent: dict[str, Any]) -> int:
    r = await client.post(f"{url}/v{API}/agents/{agent['id']}", json=enrolment(agent))
    return r.status_code


def soak_table(r: dict[str, Any]) -> str:
    rows = ["| minute | verifier VmRSS MB | anonymous MB | file + shmem MB | polls so far | verifier CPU s | states |",
            "|---|---|---|---|---|---|---|"]
    for s in r["samples"]:
        rows.append(f"| {s['t_s'] / 60:.1f} | {s['rss_kb'] / 1024:.1f} | {s['anon_kb'] / 1024:.1f} | "
                    f"{s['file_kb'] / 1024:.1f} | {s['polls']:,} | {s['cpu_s']:.1f} | "
                    f"{', '.join(f'{k}:{v}' for k, v in sorted(s['states'].items()))} |")
    lo_hi = r.get("rss_after_warmup_kb")
    spread = f"; RSS after warm-up {lo_hi[0] / 1024:.1f}-{lo_hi[1] / 1024:.1f} MB" if lo_hi else ""
    return (f"### Soak ({r['agents']} agents, quote_interval {r['quote_interval']:g} s, {r['minutes']:g} min, "
            f"a sample every {r['sample_s']:g} s; slope over the samples after {r['warmup_minutes']:g} min)\n\n"
            + "\n".join(rows)
            + f"\n\nRSS slope after warm-up: {r['slope_kb_per_min']:+.1f} KB/min "
              f"({r['slope_kb_per_min_per_agent']:+.3f} KB/min per agent; "
              f"{r.get('polls_after_warmup', 0):,} polls in that time){spread}; anonymous memory "
              f"{r['anon_slope_kb_per_min']:+.1f} KB/min, file-backed + shared "
              f"{r['file_slope_kb_per_min']:+.1f} KB/min")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "agents":
        logging.basicConfig(level=logging.WARNING)
        trio.run(agents_main, Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) >= 2 and sys.argv[1] == "keytrio":
        ap = argparse.ArgumentParser(prog="python -m bench.fleet keytrio",
                                     description="benchmark 4, keytrio's verifier only (no upstream needed)")
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--sizes", default="100", help="comma-separated N values")
        ap.add_argument("--seconds", type=float, default=30.0, help="measuring window per N")
        ap.add_argument("--policy-files", type=int, default=10_000)
        ap.add_argument("--cpu", type=int, default=None, help="CPU the verifier is pinned to (default: the last)")
        ap.add_argument("--py-spy", default=None, help="also sample the verifier during the window into this file")
        ap.add_argument("--cprofile", default=None,
                        help="run the verifier under cProfile (whole run, incl. warm-up) into this file")
        ap.add_argument("--py-spy-args", default="", help="more py-spy record options, e.g. --gil or --native")
        report = run_keytrio_only(ap.parse_args(sys.argv[2:]))
        print(tables(report))
        return
    if len(sys.argv) >= 2 and sys.argv[1] == "soak":
        ap = argparse.ArgumentParser(prog="python -m bench.fleet soak",
                                     description="keytrio's verifier with N agents for a while: RSS over time and "
                                                 "its slope after warm-up")
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--agents", type=int, default=50)
        ap.add_argument("--minutes", type=float, default=6.0, help="how long, from the last enrolment")
        ap.add_argument("--warmup", type=float, default=1.5, help="minutes left out of the slope")
        ap.add_argument("--sample", type=float, default=15.0, help="seconds between two RSS samples")
        ap.add_argument("--quote-interval", type=float, default=2.0)
        ap.add_argument("--policy-files", type=int, default=10_000)
        ap.add_argument("--cpu", type=int, default=None, help="CPU the verifier is pinned to (default: the last)")
        report = run_soak(ap.parse_args(sys.argv[2:]))
        print(soak_table(report))
        return
    raise SystemExit("usage: python -m bench.fleet agents DIR CV_CA_DIR POLICY_FILES\n"
                     "       python -m bench.fleet keytrio --out DIR [--sizes N,..] [--seconds S] [--py-spy FILE]\n"
                     "       python -m bench.fleet soak --out DIR [--agents N] [--minutes M] [--sample S]")


if __name__ == "__main__":
    main()
