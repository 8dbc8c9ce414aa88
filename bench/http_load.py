"""Benchmark 3: ``POST /v2.5/verify/evidence`` on both verifiers, same evidence, same client.

One run per body size (``--http-bodies``, KiB; default 15 and 1024): the body carries an IMA list
of as many lines as make it that large, and a runtime policy listing exactly those files (each
line adds ~247 bytes: the log line and its policy entry; 0 lines is ~3.4 KB of quote and keys).
keytrio's verifier (bench.keytrio_server) and upstream's (a running up.sh DIR) are pinned to the
same CPU; this client (``--concurrency`` keep-alive TLS connections over trio with pre-built
request bytes: httpx's own cost per request made the client the limit at small bodies; httpx
only for the validity controls) runs on the other CPUs. Rounds alternate keytrio / upstream for ``--http-seconds`` in total per side.
Before timing, each side must say ``valid: true`` for the evidence and ``valid: false`` for the
same evidence with a wrong nonce.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import stats
from keytrio.actors.common import tls

BODY_FIXED_BYTES = 3425  # a body with an empty IMA list (RSA-2048 AK/EK, quote of 10 PCRs)
BODY_BYTES_PER_LINE = 247  # one ima-ng line of bench.gen + its policy entry, JSON-escaped


def lines_for_bodies(spec: str) -> list[int]:
    """IMA list lengths whose evidence bodies are about the sizes of ``spec`` ("15,1024": KiB)."""
    out = []
    for word in spec.split(","):
        if word.strip():
            target = float(word) * 1024
            out.append(max(0, round((target - BODY_FIXED_BYTES) / BODY_BYTES_PER_LINE)))
    return out


def _env_sh(up_dir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (up_dir / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            (word,) = shlex.split(value)
            env[name] = word
    return env


@contextlib.contextmanager
def server_process(module_args: list[str], log_path: Path, cpu: int, ready: str) -> Iterator[list[str]]:
    """``python -m <module_args>`` (keytrio's side of a benchmark) pinned to ``cpu`` in a session of
    its own, while this process stays off that CPU; yields the words after ``ready`` on the server's first stdout
    line (its ports). Stopped (SIGTERM) on exit."""
    others = set(os.sched_getaffinity(0)) - {cpu}
    if others:
        os.sched_setaffinity(0, others)  # the client never shares the servers' CPU
    try:
        with open(log_path, "w") as srv_log:
            srv = subprocess.Popen(
                [sys.executable, "-m", *module_args], stdout=subprocess.PIPE, stderr=srv_log, text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
                # its own session, as up.sh starts upstream's servers: with the kernel's autogroup
                # scheduling a session shares one CPU weight, and this one holds the busy client
                start_new_session=True,
            )  # fmt: skip
            try:
                assert srv.stdout is not None
                line = srv.stdout.readline()
                if not line.startswith(ready + " "):
                    raise RuntimeError(f"{module_args[0]} did not start: {line!r}; see {log_path}")
                yield line.split()[1:]
            finally:
                srv.terminate()
                srv.wait(timeout=10)
    finally:
        if others:
            os.sched_setaffinity(0, others | {cpu})


def _group_stats(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/pid/stat after the command name) of every process of group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:
            yield int(entry.name), fields


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system, every thread) the processes of group ``pgid`` have used so far:
    a server's own cost per request, which a busy shared machine does not inflate as it does the
    requests per second (waiting for the CPU is not counted)."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _group_stats(pgid))  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _pgid_of(marker: str) -> int:
    """The process group of the process whose command line holds ``marker`` (keytrio's server)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    return os.getpgid(int(entry.name))
            except OSError:
                continue
    raise RuntimeError(f"no process with {marker!r} on its command line")


def pin_group(pgid: int, cpu: int) -> list[int]:
    """Pin every process of process group ``pgid`` (up.sh starts each server in its own session)."""
    pinned = []
    for pid, _ in _group_stats(pgid):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
            pinned.append(pid)
        except OSError:
            continue
    return pinned


def evidence_body(inputs_dir: Path, inputs: dict[str, Any], lines: int, *, nonce: str | None = None
                  ) -> dict[str, Any]:
    """The evidence of the checkpoint of ``lines`` lines (bench.gen made one for each body size)."""
    (case,) = [c for c in inputs["cases"] if c["lines"] == lines]
    n = case["lines"]
    lines = (inputs_dir / "ima.txt").read_text().splitlines(keepends=True)[:n]
    policy = json.loads((inputs_dir / "policy.json").read_text())
    # a policy listing exactly the files of this list (the policy file lists them in log order)
    policy["digests"] = dict(list(policy["digests"].items())[:n])
    data = {
        "nonce": nonce or case["nonce"], "quote": case["quote"], "hash_alg": inputs["bank"],
        "tpm_ak": inputs["ak_b64"], "tpm_ek": inputs["ek_b64"], "tpm_policy": json.dumps(inputs["tpm_policy"]),
        "runtime_policy": json.dumps(policy), "mb_policy": "", "ima_measurement_list": "".join(lines), "mb_log": "",
    }  # fmt: skip
    return {"type": "tpm", "data": data}


async def _valid(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Any:
    r = await client.post(url, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return r.status_code, r.json().get("results", {}).get("valid")
    except ValueError:
        return r.status_code, None


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.I)


async def _load(ctx: ssl.SSLContext, url: str, payload: bytes, concurrency: int, seconds: float
                ) -> tuple[list[float], int, float]:
    """``concurrency`` keep-alive connections posting ``payload`` back to back for ``seconds``.

    A lean client (pre-built request bytes over trio's TLS stream, the answer read by its
    Content-Length and its JSON decoded): httpx costs the client about a millisecond of CPU a
    request, which made the client, not the server, the limit at small bodies."""
    u = httpx.URL(url)
    host, port = u.host, u.port or 443
    request = (f"POST {u.raw_path.decode()} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload
    latencies: list[float] = []
    errors = 0
    deadline = trio.current_time() + seconds

    async def one() -> None:
        nonlocal errors
        stream: trio.SSLStream[trio.SocketStream] | None = None
        buf = b""
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            try:
                if stream is None:
                    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ctx, https_compatible=True)
                    buf = b""
                await stream.send_all(request)
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(1 << 16)
                    if not chunk:
                        raise trio.BrokenResourceError("closed")
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                m = _CONTENT_LENGTH.search(head)
                if m is None:
                    raise ValueError("answer without Content-Length")
                size = int(m.group(1))
                while len(buf) < size:
                    chunk = await stream.receive_some(1 << 16)
                    if not chunk:
                        raise trio.BrokenResourceError("closed")
                    buf += chunk
                body, buf = buf[:size], buf[size:]
                ok = head.startswith(b"HTTP/1.1 200") and json.loads(body)["results"]["valid"] in (True, 1)
                if b"\r\nconnection: close" in head.lower():
                    await stream.aclose()
                    stream = None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError, KeyError):
                ok = False
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                stream = None
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        if stream is not None:
            await trio.aclose_forcefully(stream)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(one)
    return latencies, errors, time.perf_counter() - t0


async def _bench(urls: dict[str, str], ca: Path, body: dict[str, Any], bad: dict[str, Any], concurrency: int,
                 seconds: float, pgids: dict[str, int]) -> dict[str, Any]:
    ctx = tls.client_context([ca / "cacert.crt"], ca / "client-cert.crt", ca / "client-private.pem")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(verify=ctx, timeout=60.0, limits=limits) as client:
        for name, url in urls.items():
            good, wrong = await _valid(client, url, body), await _valid(client, url, bad)
            if good[0] != 200 or good[1] not in (True, 1):
                raise RuntimeError(f"{name}: evidence not valid: {good}")
            if wrong[1] not in (False, 0):
                raise RuntimeError(f"{name}: evidence with a wrong nonce not invalid: {wrong}")
            out[name] = {"latencies": [], "requests": 0, "errors": 0, "seconds": 0.0, "cpu": 0.0,
                         "control_wrong_nonce": {"status": wrong[0], "valid": wrong[1]}}
        payload = json.dumps(body).encode()
        rounds = 4
        names = list(urls)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                cpu0 = group_cpu(pgids[name])
                lat, errors, took = await _load(ctx, urls[name], payload, concurrency, seconds / rounds)
                o = out[name]
                o["cpu"] += group_cpu(pgids[name]) - cpu0
                o["latencies"] += lat
                o["requests"] += len(lat)
                o["errors"] += errors
                o["seconds"] += took
    return out


def run(args: argparse.Namespace, inputs_dir: Path, inputs: dict[str, Any], cpu: int) -> dict[str, Any]:
    up_dir: Path = args.upstream_dir
    env = _env_sh(up_dir)
    ca = Path(env["KL_CA_DIR"])
    up_pgid = int((up_dir / "run" / "verifier.pid").read_text().strip())
    pinned = pin_group(up_pgid, cpu)
    cases = []
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-verifier-") as data_dir, \
            server_process(["bench.keytrio_server", str(ca), data_dir], Path(args.out) / "keytrio-verifier.log",
                           cpu, "PORT") as ports:
        urls = {"keytrio": f"https://127.0.0.1:{int(ports[0])}/v2.5/verify/evidence",
                "upstream": f"{env['KL_VERIFIER_URL']}/v2.5/verify/evidence"}
        pgids = {"keytrio": _pgid_of(data_dir), "upstream": up_pgid}
        for lines in lines_for_bodies(args.http_bodies):
            body = evidence_body(inputs_dir, inputs, lines)
            bad = evidence_body(inputs_dir, inputs, lines, nonce="X" * 20)
            res = trio.run(_bench, urls, ca, body, bad, args.concurrency, args.http_seconds, pgids)
            cases.append(_case(res, lines, len(json.dumps(body))))
    return {"concurrency": args.concurrency, "seconds_per_side": args.http_seconds, "upstream_pids_pinned": pinned,
            "cases": cases}


def _case(res: dict[str, Any], lines: int, body_bytes: int) -> dict[str, Any]:
    k, u = res["keytrio"], res["upstream"]
    rps = {name: o["requests"] / o["seconds"] if o["seconds"] else 0.0 for name, o in res.items()}
    return {
        "ima_lines": lines, "body_bytes": body_bytes,
        "rps": rps, "rps_speedup": rps["keytrio"] / rps["upstream"] if rps["upstream"] else float("nan"),
        # server CPU seconds per answered request (clock-tick resolution over each side's windows)
        "cpu_per_request": {name: o["cpu"] / o["requests"] if o["requests"] else float("nan")
                            for name, o in res.items()},
        "latency": stats.compare(k["latencies"], u["latencies"]) if k["latencies"] and u["latencies"] else None,
        "errors": {name: o["errors"] for name, o in res.items()},
        "controls": {name: o["control_wrong_nonce"] for name, o in res.items()},
        "samples": {name: o["latencies"] for name, o in res.items()},
    }  # fmt: skip


def tables(http: dict[str, Any]) -> str:
    rows = [
        "| body | side | requests/s | server CPU/request | latency median | p10 | p90 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in http["cases"]:
        label = f"{c['body_bytes'] / 1024:,.0f} KiB ({c['ima_lines']:,} lines)"
        lat = c["latency"]
        for side in ("keytrio", "upstream"):
            q = [stats.fmt_time(lat[side][k]) if lat else "" for k in ("median", "p10", "p90")]
            cpu = stats.fmt_time(c["cpu_per_request"][side])
            rows.append(f"| {label} | {side} | {c['rps'][side]:.1f} | {cpu} | {' | '.join(q)} | {c['errors'][side]} |")
        ratio = [f"{lat['keytrio'][k] / lat['upstream'][k]:.3f}" if lat else "" for k in ("median", "p10", "p90")]
        cpu_k, cpu_u = c["cpu_per_request"]["keytrio"], c["cpu_per_request"]["upstream"]
        cpu_ratio = f"{cpu_k / cpu_u:.3f} ({cpu_u / cpu_k:.2f}x)" if cpu_k > 0 and cpu_u > 0 else ""
        rows.append(f"| {label} | keytrio/upstream | **{c['rps_speedup']:.2f}** | {cpu_ratio} | {' | '.join(ratio)} | |")
    return (f"### 3. Evidence endpoint (POST /v2.5/verify/evidence, {http['concurrency']} concurrent, keep-alive, "
            f"{http['seconds_per_side']:.0f} s per side and body)\n\n" + "\n".join(rows))
