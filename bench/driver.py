"""The benchmark driver (keytrio's interpreter): inputs, two pinned workers, A B A B, report.

    python -m bench.driver --out DIR [--quick] [--kl-venv PATH] [--upstream-dir UP_DIR]

Both workers are pinned to the same CPU (``--cpu``, default the last one) with
``os.sched_setaffinity`` and take turns: each round runs keytrio then upstream on the same inputs,
the next round upstream first, and so on. Every timed call must come back valid; the tampered
controls (a forged IMA line, a wrong nonce) must come back invalid on both sides - otherwise the
run fails. ``DIR/bench.json`` holds the raw samples of both sides; ``DIR/tables.md`` the tables.
With ``--upstream-dir`` (a DIR started by tests/interop/upstream/up.sh) the HTTP benchmarks run
too: the evidence endpoint (bench.http_load), registration (bench.registration) and the fleet
(bench.fleet). The upstream worker runs in the ``--kl-venv`` venv, made when missing by
tests/interop/upstream/venv.sh (pip-installs keylime==7.14.3 once; then cached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import stats

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KL_VENV = Path(os.environ.get("KEYTRIO_KL_VENV", Path.home() / ".cache/keytrio-klvenv"))
VENV_SH = REPO / "tests" / "interop" / "upstream" / "venv.sh"


class BenchError(RuntimeError):
    pass


def upstream_python(venv: Path) -> str:
    """The interpreter of the upstream venv ``venv``, made (or checked: a second or two) by venv.sh."""
    env = {**os.environ, "KEYTRIO_KL_VENV": str(venv)}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", str(VENV_SH)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{VENV_SH} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return str(Path(proc.stdout.strip()) / "bin" / "python")


class Worker:
    """One long-lived worker process pinned to ``cpu``; ``call(cmd)`` -> its JSON answer."""

    def __init__(self, name: str, python: str, module: str, cpu: int, log: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("VIRTUAL_ENV", None)
        self.log = log
        self._stderr = open(log, "w")
        self.proc = subprocess.Popen(
            [python, "-m", module], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, bufsize=1, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )  # fmt: skip
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"{self.name} worker exited; see {self.log}:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise BenchError(f"{self.name} worker failed on {cmd.get('op')}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kb / 1048576, 1),
        "kernel": platform.release(), "python": platform.python_version(), "loadavg_start": os.getloadavg(),
    }  # fmt: skip


def _check_valid(side: str, what: str, reply: dict[str, Any], expect: bool = True) -> None:
    bad = [i for i, v in enumerate(reply["valid"]) if v is not expect]
    if bad:
        word = "invalid" if expect else "valid"
        raise BenchError(f"{side}: {what}: {len(bad)} of {len(reply['valid'])} calls came back {word}")


def interleave(workers: list[Worker], rounds: int, cmd_for: Any, what: str) -> dict[str, list[float]]:
    """``rounds`` rounds; round i runs the workers in order, reversed on odd rounds (A B, B A, ...)."""
    samples: dict[str, list[float]] = {w.name: [] for w in workers}
    wall: dict[str, list[float]] = {w.name: [] for w in workers}
    for r in range(rounds):
        order = workers if r % 2 == 0 else list(reversed(workers))
        for w in order:
            reply = w.call(cmd_for(r))
            _check_valid(w.name, what, reply)
            samples[w.name].extend(reply["samples"])
            wall[w.name].extend(reply["wall"])
    return {"cpu": samples, "wall": wall}


def bench_evidence(workers: list[Worker], inputs: dict[str, Any], quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": []}
    for idx, case in enumerate(inputs["cases"]):
        if case.get("extra"):
            continue  # a body size of the evidence endpoint (bench.http_load), not a case here
        n = case["lines"]
        total = 40 if n <= 1000 else 12 if n <= 10_000 else 4
        if quick:
            total = max(4, total // 2)
        rounds = 4 if total >= 8 else 2
        per = max(1, total // rounds)
        samples = interleave(workers, rounds, lambda r, idx=idx, per=per: {"op": "evidence", "case": idx, "reps": per},
                             f"evidence {n} lines")
        out["cases"].append(_compared(samples, lines=n))
    controls = {}
    for w in workers:
        if inputs.get("tampered"):
            _check_valid(w.name, "tampered IMA line", w.call({"op": "evidence", "tamper": True}), expect=False)
        last = max(i for i, c in enumerate(inputs["cases"]) if not c.get("extra"))
        wrong = w.call({"op": "evidence", "case": last, "nonce": "X" * 20})
        _check_valid(w.name, "wrong nonce", wrong, expect=False)
        controls[w.name] = {"tampered_ima_line": "invalid", "wrong_nonce": "invalid"}
    out["controls"] = controls
    return out


def bench_poll(workers: list[Worker], inputs: dict[str, Any]) -> dict[str, Any]:
    setups = {}
    for w in workers:
        s = w.call({"op": "poll_setup"})
        if not s["valid"]:
            raise BenchError(f"{w.name}: first attestation of the steady-state agent failed: {s}")
        setups[w.name] = s
    polls = len(inputs["polls"])
    chunk = max(1, min(10, polls // 4))
    rounds = polls // chunk
    samples = interleave(workers, rounds, lambda r: {"op": "poll", "start": r * chunk, "count": chunk},
                         "steady-state poll")
    return _compared(samples, base_lines=inputs["steady"]["lines"], new_lines_per_poll=inputs["lines_per_poll"],
                     policy_files=inputs["policy_files"])


def _compared(samples: dict[str, dict[str, list[float]]], **extra: Any) -> dict[str, Any]:
    """CPU-time comparison (headline) + wall-clock comparison, with every raw sample."""
    cpu, wall = samples["cpu"], samples["wall"]
    return {**extra, **stats.compare(cpu["keytrio"], cpu["upstream"]),
            "wall": stats.compare(wall["keytrio"], wall["upstream"]), "samples": cpu, "wall_samples": wall}


def _row(label: str, c: dict[str, Any]) -> str:
    k, u = c["keytrio"], c["upstream"]
    return (f"| {label} | {stats.fmt_time(k['median'])} ({stats.fmt_time(k['p10'])}-{stats.fmt_time(k['p90'])}) "
            f"| {stats.fmt_time(u['median'])} ({stats.fmt_time(u['p10'])}-{stats.fmt_time(u['p90'])}) "
            f"| {c['ratio']:.3f} | {c['speedup']:.1f}x |")


def tables(report: dict[str, Any]) -> str:
    head = ("| case | keytrio median (p10-p90) | upstream median (p10-p90) | keytrio/upstream | speedup |\n"
            "|---|---|---|---|---|")
    parts = []
    ev = report.get("evidence")
    if ev:
        rows = [_row(f"{c['lines']:,} lines", c) for c in ev["cases"]]
        parts.append("### 1. Evidence check, first attestation\n\n" + head + "\n" + "\n".join(rows))
    poll = report.get("poll")
    if poll:
        label = f"+{poll['new_lines_per_poll']} lines on {poll['base_lines']:,}, policy {poll['policy_files']:,} files"
        parts.append("### 2. Steady-state poll (verifier CPU per poll)\n\n" + head + "\n" + _row(label, poll))
    http = report.get("http")
    if http:
        from bench import http_load

        parts.append(http_load.tables(http))
    if report.get("fleet"):
        from bench import fleet

        parts.append(fleet.tables(report["fleet"]))
    if report.get("registration"):
        from bench import registration

        parts.append(registration.tables(report["registration"]))
    return "\n\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench import gen  # keytrio's code: imported here so `--help` stays light

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    inputs_dir = out / "inputs"
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.monotonic()
    import trio

    extra = []
    if args.upstream_dir and "http" in args.only:
        from bench import http_load

        extra = http_load.lines_for_bodies(args.http_bodies)
    inputs = trio.run(gen.generate, inputs_dir, sizes, args.polls, args.lines_per_poll, extra)
    print(f"[bench] inputs ready in {time.monotonic() - t0:.1f}s ({inputs_dir})", file=sys.stderr)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    kl_python = upstream_python(Path(args.kl_venv))
    report: dict[str, Any] = {"machine": machine(), "cpu_pinned": cpu, "quick": args.quick,
                              "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    workers = [Worker("keytrio", sys.executable, "bench.worker_keytrio", cpu, out / "worker-keytrio.log"),
               Worker("upstream", kl_python, "bench.worker_upstream", cpu, out / "worker-upstream.log")]
    try:
        loaded = {w.name: w.call({"op": "load", "dir": str(inputs_dir)}) for w in workers}
        report["upstream_version"] = loaded["upstream"].get("keylime")
        report["pythons"] = {w.name: w.hello["python"] for w in workers}
        if "evidence" in args.only:
            report["evidence"] = bench_evidence(workers, inputs, args.quick)
            print("[bench] evidence done", file=sys.stderr)
        if "poll" in args.only and inputs["polls"]:
            report["poll"] = bench_poll(workers, inputs)
            print("[bench] poll done", file=sys.stderr)
    finally:
        for w in workers:
            w.close()
    if args.upstream_dir and "http" in args.only:
        from bench import http_load

        report["http"] = http_load.run(args, inputs_dir, inputs, cpu)
        print("[bench] http done", file=sys.stderr)
    if args.upstream_dir and "registration" in args.only:
        from bench import registration

        report["registration"] = registration.run(args, cpu)
        print("[bench] registration done", file=sys.stderr)
    if args.upstream_dir and "fleet" in args.only:
        from bench import fleet

        report["fleet"] = fleet.run(args, cpu)
        print("[bench] fleet done", file=sys.stderr)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "tables.md").write_text(tables(report))
    return report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="IMA list sizes (default 0,1000,10000; full run adds 100000)")
    ap.add_argument("--polls", type=int, default=None)
    ap.add_argument("--lines-per-poll", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=None, help="CPU both workers (and the servers) are pinned to")
    ap.add_argument("--kl-venv", default=str(DEFAULT_KL_VENV))
    ap.add_argument("--upstream-dir", type=Path, default=None, help="a DIR running tests/interop/upstream/up.sh (HTTP benchmarks)")
    ap.add_argument("--http-seconds", type=float, default=None)
    ap.add_argument("--http-bodies", default="15,1024",
                    help="evidence endpoint body sizes in KiB, one IMA list (+ policy of its files) each")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--fleet-sizes", default=None, help="fleet N values (default 20 quick, 50,200,500 full)")
    ap.add_argument("--fleet-seconds", type=float, default=None, help="fleet measuring window per side and N")
    ap.add_argument("--fleet-policy-files", type=int, default=10_000, help="files in the shared runtime policy")
    ap.add_argument("--reg-rounds", type=int, default=None, help="registration rounds per side (A B B A ...)")
    ap.add_argument("--reg-per-round", type=int, default=None, help="new agent ids per registration round")
    ap.add_argument("--reg-concurrency", type=int, default=8)
    ap.add_argument("--only", default="evidence,poll,http,registration,fleet",
                    help="comma-separated subset of evidence,poll,http,registration,fleet")
    return ap


#: option -> (--quick value, full-run value)
SIZE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "sizes": ("0,1000,10000", "0,1000,10000,100000"),
    "polls": (40, 200),
    "http_seconds": (5.0, 15.0),
    "fleet_sizes": ("20", "50,200,500"),
    "fleet_seconds": (10.0, 30.0),
    "reg_rounds": (2, 4),
    "reg_per_round": (50, 100),
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name, (quick, full) in SIZE_DEFAULTS.items():  # options left unset follow --quick
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.only = set(args.only.split(","))
    try:
        report = run(args)
    except BenchError as exc:
        print(f"[bench] FAILED: {exc}", file=sys.stderr)
        return 1
    print(tables(report))
    print(f"[bench] raw samples: {args.out / 'bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
