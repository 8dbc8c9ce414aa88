"""Microbenchmark: one steady-state iteration of the verifier's monitor loop (``Monitor.run``) on
this tree's code, with what lies outside the loop's own Python stubbed: the attestation round
(``attest.attest_once``: a success that suspends nowhere), the agent row and target (no TPM key),
the success record (``records.submit_success``: a record already written) and the store's
``collect``. What is left is the loop as it runs between two polls: collecting the last record,
the request slot, the poll metrics, the verdict's bookkeeping, the hand-over. The timer's sleep is
stubbed too (a no-op: the loop never yields, so what is timed is its Python alone; the sleep's
cost is the scheduler's and the same in every tree; the cancel at the end is seen by the loop's
own cancel check). Min of the rounds, µs per iteration. Run it from two worktrees in turn to compare codes
(the seventh round of issue 20 item 4, docs/performance.md).

    python -m bench.micro_poll_loop
"""

from __future__ import annotations

import itertools
import math
import time
from types import SimpleNamespace
from typing import Any

import trio

from keytrio.actors.verifier import attest, monitor, records
from keytrio.protocol.quote import ClockInfo

ROW = {"agent_id": "a1", "operational_state": records.GET_QUOTE, "v_delivered": True, "v": None,
       "tpm_clock_info": None, "next_ima_ml_entry": 7, "boottime": 12, "hash_alg": "sha256",
       "enc_alg": "rsa", "sign_alg": "rsassa", "attestation_count": 0}
CLOCK = ClockInfo(100_000, 3, 1, 1)


class _Done:
    """A success record whose group committed (what ``collect`` finds on a steady poll)."""

    done = True


class _Store:
    async def collect(self, record: Any) -> int:
        return 1

    def drop(self, record: Any) -> bool:
        return False


async def _get(store: Any, agent_id: str) -> dict[str, Any]:
    return dict(ROW)


def _submit(store: Any, agent_id: str, **values: Any) -> _Done:
    return _Done()


async def _run(n: int, rounds: int, out: list[float]) -> None:
    async with trio.open_nursery() as nursery:
        ms = monitor.MonitorSet(
            _Store(), nursery=nursery, settings=monitor.MonitorSettings(quote_interval=0.0),  # type: ignore[arg-type]
            context_for=lambda row: None, notifier=None)  # type: ignore[arg-type]
        count = 0
        marks: list[float] = []

        async def attest_once(client: Any, target: Any, state: Any, *, max_response_bytes: int) -> list[Any]:
            nonlocal count
            state.clock = CLOCK
            state.attestation_count += 1
            count += 1
            if count % n == 1:
                marks.append(time.perf_counter())
                if len(marks) > rounds:
                    nursery.cancel_scope.cancel()
            return []

        attest.attest_once = attest_once  # type: ignore[assignment]

        async def sleep_until(deadline: float) -> None:
            pass

        ms.timer.sleep_until = sleep_until  # type: ignore[method-assign]
        nursery.start_soon(monitor.Monitor(ms, "a1").run)
    out.extend((b - a) / n * 1e6 for a, b in itertools.pairwise(marks))


def main(n: int = 20_000, rounds: int = 7) -> None:
    records.get = _get  # type: ignore[assignment]
    records.submit_success = _submit  # type: ignore[assignment]
    monitor.target_from_row = lambda row, ima=None, **kw: SimpleNamespace(ima_check=None)  # type: ignore[assignment]
    times: list[float] = []
    trio.run(_run, n, rounds, times)
    best = min(times) if times else math.inf
    print(f"monitor loop, steady iteration: {best:.2f} µs (rounds: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
