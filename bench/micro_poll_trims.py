"""Microbenchmark: three per-poll calls of the verifier's steady-state poll that the sixth round of
issue 20 item 4 trimmed (docs/performance.md, "Sixth round"), on this tree's code: the idle
connection's peek before a request (``RawConn.is_readable``), a steady success record queued for
the group committer (``records.submit_success``, not committed), and the monitor's "stopped while
this step ran?" check 8 cancel scopes deep (``monitor._cancelled``, or what it replaced,
``trio.current_effective_deadline() == -math.inf``, on a tree without it). Min of the rounds, in µs
per call. Run it from two worktrees in turn to compare codes.

    python -m bench.micro_poll_trims
"""

from __future__ import annotations

import math
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from keytrio.actors.common.rawconn import RawConn
from keytrio.actors.common.store import Store, sqlite_url
from keytrio.actors.verifier import monitor, records, schema
from keytrio.protocol.quote import ClockInfo


def _best(fn: Callable[[], object], n: int = 20_000, rounds: int = 7) -> float:
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


async def _in_trio(out: dict[str, float], n: int = 5_000, rounds: int = 7) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = await Store.open(sqlite_url(Path(d) / "db.sqlite"), schema.metadata)
        clock = ClockInfo(100_000, 3, 1, 1)
        best = math.inf
        async with trio.open_nursery() as nursery:
            for _ in range(rounds):
                jobs = []
                t = time.perf_counter()
                for i in range(n):
                    jobs.append(records.submit_success(
                        store, "a1", nursery=nursery, now=1000.0 + i, hash_alg=None, enc_alg=None, sign_alg=None,
                        next_ima_ml_entry=7, ima_pcr10=None, ima_progress=None, boottime=None, clock_info=clock,
                        state=None, only_in_states=monitor.ACTIVE_STATES))
                best = min(best, (time.perf_counter() - t) / n)
                for job in jobs:
                    store.drop(job)
            nursery.cancel_scope.cancel()
        await store.close()
    out["submit_success (steady)"] = best * 1e6
    check = getattr(monitor, "_cancelled", None) or (lambda: trio.current_effective_deadline() == -math.inf)

    async def nest(depth: int) -> None:
        if depth == 0:
            out["cancel check (8 scopes deep)"] = _best(check)
            return
        async with trio.open_nursery():
            with trio.CancelScope():
                await nest(depth - 1)

    await nest(4)


def main() -> None:
    mine, peer = socket.socketpair()
    conn = RawConn(mine)
    out = {"is_readable (idle)": _best(conn.is_readable)}
    conn.close(notify=False)
    peer.close()
    trio.run(_in_trio, out)
    print(" | ".join(f"{k} {v:.2f} µs" for k, v in out.items()))


if __name__ == "__main__":
    main()
