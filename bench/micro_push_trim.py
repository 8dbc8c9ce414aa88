"""Per-change microbenchmark of 4c.9 (issue 19 item 7): the general path against the new one.

    python -m bench.micro_push_trim [--rounds 5] [--number 20000]

Canned input, this process only, min over rounds of the mean per call (µs), general and new
alternating within each round:

- the TPM clock of one passed check: the row's ``tpm_clock_info`` parsed (``json.loads`` +
  ``ClockInfo.from_json``) and the new clock's text written (``json.dumps(to_json(),
  sort_keys=True)`` by the kept encoder), against EvalStates.previous_clock (the text the previous
  pass wrote, kept) and EvalStates.clock_text (a fresh clock each call, as each quote has).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from keytrio.actors.verifier.push import verify
from keytrio.actors.verifier.push.evalstate import EvalStates
from keytrio.protocol.quote import ClockInfo


def _per_call(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--number", type=int, default=20000)
    args = ap.parse_args()

    agent = "a0000000-0000-4000-8000-00000000000a"
    ticks = [123456789]
    stored = [json.dumps(ClockInfo(ticks[0], 3, 0, 1).to_json(), sort_keys=True)]
    states = EvalStates(None)

    def clock_general() -> None:
        ClockInfo.from_json(json.loads(stored[0]))
        ticks[0] += 2000
        stored[0] = verify._dumps_sorted(ClockInfo(ticks[0], 3, 0, 1).to_json())

    def clock_new() -> None:
        states.previous_clock(agent, stored[0])
        ticks[0] += 2000
        stored[0] = states.clock_text(agent, ClockInfo(ticks[0], 3, 0, 1))

    cases = [
        ("the stored TPM clock of one passed check (read + write)", clock_general, clock_new),
    ]
    for name, general, new in cases:
        best = [float("inf"), float("inf")]
        for _ in range(args.rounds):
            best[0] = min(best[0], _per_call(general, args.number))
            best[1] = min(best[1], _per_call(new, args.number))
        print(f"{name}: general {best[0]:.2f} µs, new {best[1]:.2f} µs, saved {best[0] - best[1]:.2f} µs")


if __name__ == "__main__":
    main()
