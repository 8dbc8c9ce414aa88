"""Where a poll's CPU goes: py-spy raw stacks of the verifier, folded into named buckets.

    python -m bench.sim_profile PYSPY_RAW [--cpu-per-poll-us 1500] [--top 25]

py-spy (``record --format raw``, without ``--idle``) samples only threads that are running, so
the share of samples is the share of CPU time of Python-visible work; C code (OpenSSL, SQLite,
json's scanner) is charged to the Python frame that called it. A stack goes to the bucket of its
innermost frame that matches a rule below (the rules are tried in order on that frame; frames
that match nothing are skipped outwards). With ``--cpu-per-poll-us`` (the /proc figure of the same
window) each bucket is also given in microseconds per poll.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: (bucket, file regex, function regex): the first rule that matches a frame names its bucket
RULES: list[tuple[str, str, str]] = [
    (WAIT := "event-loop wait (epoll_wait; on a loaded machine also the wait for a CPU after it)",
     r"trio/_core/_io_epoll\.py", r"get_events"),
    # an idle trio worker thread blocked on its job lock (acquire with a timeout): py-spy's idle
    # detection misses that wait; it is no CPU either
    (IDLE := "idle worker thread (waiting for a job; not counted)", r"trio/_core/_thread_cache\.py", r"^WorkerThread\._work$"),
    ("signature check (RSA verify)", r"protocol/quote_check\.py|bench/floor_serve\.py", r"_verify_signature"),
    # the floors' own parts (bench/floor_*.py, docs/performance.md 4c.15) in the buckets of the same work
    ("IMA incremental check", r"bench/floor_serve\.py", r"^check_ima$"),
    ("quote decode + checks", r"bench/floor_serve\.py|bench/floor_pull\.py", r"^check_quote$|^Poller\.check$"),
    ("store (SQLAlchemy, SQLite, records)", r"bench/floor_serve\.py", r"^Rows\."),
    ("poll timer (poll_timer.py, deadline_heap.py)", r"verifier/poll_timer\.py|common/deadline_heap\.py", r".*"),
    ("logging", r"(^|/)logging/|actors/common/logs\.py", r".*"),
    ("metrics", r"prometheus_client|actors/common/metrics\.py|verifier/metrics\.py", r".*"),
    ("TLS (ssl, trio SSLStream)", r"(^|/)ssl\.py|trio/_ssl\.py", r".*"),
    ("socket I/O (trio sockets, epoll)", r"trio/_socket\.py|trio/_highlevel_socket\.py|trio/_core/_io_epoll\.py", r".*"),
    ("thread hand-off (trio.to_thread for SQLite)",
     r"trio/_threads\.py|trio/_core/_thread_cache\.py|(^|/)threading\.py|_wakeup_socketpair\.py", r".*"),
    ("JSON decode", r"(^|/)json/(decoder|__init__)\.py|protocol/safejson\.py", r"loads|decode|raw_decode|load"),
    ("JSON encode", r"(^|/)json/(encoder|__init__)\.py", r"dumps|encode|iterencode"),
    ("store (SQLAlchemy, SQLite, records)", r"sqlalchemy|sqlite3|actors/common/store\.py|verifier/records\.py", r".*"),
    ("HTTP client (KeepAliveClient, http1)",
     r"(^|/)h11/|actors/common/(client|http1|rawconn)\.py|bench/floor_pull\.py", r".*"),
    ("IMA incremental check", r"protocol/ima|verifier/ima\.py|protocol/runtime_policy\.py", r".*"),
    ("quote decode + checks", r"protocol/quote|protocol/tpm2\.py|protocol/validation\.py|protocol/envelope\.py", r".*"),
    ("attestation round (attest.py)", r"verifier/attest\.py|verifier/evidence\.py", r".*"),
    ("monitor loop (monitor.py)", r"verifier/monitor\.py|verifier/notify\.py", r".*"),
    ("verifier API (the bench's bulk GETs)", r"quart|hypercorn|werkzeug|verifier/app\.py|verifier/routes", r".*"),
    ("trio scheduler (tasks, deadlines, cancel scopes)", r"(^|/)trio/|(^|/)outcome/|(^|/)contextlib\.py", r".*"),
]
#: with ``--push`` (a push-mode verifier's profile: it serves the cycle, it is not a client), these
#: go before the "HTTP client" rule, so h11 counts as the server's and verifier/push code has names
PUSH_RULES: list[tuple[str, str, str]] = [
    ("store (push/store.py statements, SQLite)", r"verifier/push/store\.py", r".*"),
    ("HTTP server (serve.py lean path, h11, hypercorn, FastCycle, ASGI layers)",
     r"actors/common/(serve|app|bodylimit|v3errors)\.py|(^|/)h11/|hypercorn|verifier/push/fast\.py"
     r"|bench/floor_serve\.py", r".*"),
    ("check (evidence.verify, push verify.py, evalstate)",
     r"protocol/(evidence|quote_check|ima_eval|mb)\w*\.py|verifier/push/(verify|evalstate)\.py", r".*"),
    ("cycle logic (admit, plan, sessions, documents, push_wire)",
     r"verifier/push/|protocol/push_wire\.py|protocol/pop\.py|bench/floor_push\.py", r".*"),
]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
Compiled = list[tuple[str, re.Pattern[str], re.Pattern[str]]]


def compile_rules(push: bool = False) -> Compiled:
    rules = list(RULES)
    if push:
        at = next(i for i, r in enumerate(rules) if r[0].startswith("HTTP client"))
        rules[at:at] = PUSH_RULES
    return [(name, re.compile(f), re.compile(fn)) for name, f, fn in rules]


_COMPILED = compile_rules()


def bucket_of(stack: list[str], rules: Compiled | None = None) -> str:
    for frame in reversed(stack):
        m = _FRAME.match(frame.strip())
        if m is None:
            continue
        for name, file_re, func_re in rules or _COMPILED:
            if file_re.search(m["file"]) and func_re.search(m["func"]):
                return name
    return "other"


def fold(text: str, rules: Compiled | None = None) -> tuple[Counter[str], Counter[str], int]:
    """(samples per bucket, samples per innermost frame, total samples) of a py-spy raw file."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit() or not stack_text:
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        buckets[bucket_of(stack, rules)] += count
        leaves[stack[-1].strip()] += count
        total += count
    return buckets, leaves, total


def table(buckets: Counter[str], total: int, cpu_per_poll_us: float | None) -> str:
    """Shares of all samples; µs per poll scale the /proc CPU over the samples outside the
    event-loop wait (a thread that epoll woke but that waits for a CPU is 'running' to py-spy
    while it uses none, so that bucket is not counted as CPU)."""
    head = "| bucket | share of samples | µs per poll |\n|---|---|---|"
    busy = total - buckets.get(WAIT, 0) - buckets.get(IDLE, 0)
    rows = []
    for name, n in buckets.most_common():
        waits = name in (WAIT, IDLE)
        us = f"{n / busy * cpu_per_poll_us:.0f}" if cpu_per_poll_us and not waits and busy else ""
        rows.append(f"| {name} | {n / total:.1%} | {'(not counted)' if waits else us} |")
    tail = f"| total ({total:,} samples) | 100% | {cpu_per_poll_us:.0f} |" if cpu_per_poll_us else ""
    return "\n".join([head, *rows, tail])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", type=Path)
    ap.add_argument("--cpu-per-poll-us", type=float, default=None)
    ap.add_argument("--top", type=int, default=25, help="also list the N hottest innermost frames")
    ap.add_argument("--push", action="store_true", help="a push-mode verifier's profile (PUSH_RULES)")
    args = ap.parse_args(argv)
    buckets, leaves, total = fold(args.raw.read_text(), compile_rules(args.push))
    if not total:
        raise SystemExit(f"{args.raw}: no samples")
    print(table(buckets, total, args.cpu_per_poll_us))
    print(f"\nhottest innermost frames (of {total:,} samples):")
    for frame, n in leaves.most_common(args.top):
        print(f"{n / total:6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
