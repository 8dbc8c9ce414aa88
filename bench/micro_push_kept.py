"""Per-change microbenchmark of 4c.7 (issue 19 item 7): the general path against the kept one.

    python -m bench.micro_push_kept [--rounds 5] [--number 20000]

Canned input, this process only, min over rounds of the mean per call (µs), general and new
alternating within each round:

- timestamps of one push attestation: the 201's two (capabilities_received_at,
  challenges_expire_at) and the 202's four (those two again, evidence_received_at twice),
  timestamp_general against timestamp (a fresh epoch per attestation, so the memo only hits
  what the real cycle repeats);
- hypercorn's Config.response_headers("h11") against serve.response_headers (per answer);
- the PCR blob's decodes: pcr_blob.decode (parse_evidence's validation) + decode_single
  (parsed_quote) against the one decode_single parse_evidence now keeps;
- json.dumps(value, sort_keys=True) against verify._dumps_sorted on a TPM clock's JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from hypercorn.config import Config

from keytrio.actors.common import serve
from keytrio.actors.verifier.push import verify
from keytrio.protocol import pcr_blob, push_wire


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

    clock = [1764806400.0]

    def stamps(render: Callable[[float | None], str | None]) -> Callable[[], object]:
        def run() -> None:
            clock[0] += 2.0137
            got, expires, received = clock[0], clock[0] + 30, clock[0] + 0.0123
            for epoch in (got, expires, got, expires, received, received):
                render(epoch)
        return run

    config = Config()
    blob = pcr_blob.encode({"sha256": {p: bytes([p]) * 32 for p in (0, 1, 2, 3, 4, 5, 6, 7, 10)}})
    clock_json = {"clock": 123456789, "reset_count": 3, "restart_count": 0, "safe": True}
    cases = [
        ("timestamps of one attestation (6 renderings)", stamps(push_wire.timestamp_general), stamps(push_wire.timestamp)),
        ("hypercorn response headers (per answer)", lambda: config.response_headers("h11"),
         lambda: serve.response_headers(config)),
        # before: parse_evidence validated with the full decode, parsed_quote decoded again
        # (decode_single); now parse_evidence's decode_single is kept and parsed_quote reads it
        ("the PCR blob's decodes of one attestation", lambda: (pcr_blob.decode(blob), pcr_blob.decode_single(blob)),
         lambda: pcr_blob.decode_single(blob)),
        ("json.dumps(sort_keys=True) of a TPM clock", lambda: json.dumps(clock_json, sort_keys=True),
         lambda: verify._dumps_sorted(clock_json)),
    ]
    for name, general, new in cases:
        best = [float("inf"), float("inf")]
        for _ in range(args.rounds):
            best[0] = min(best[0], _per_call(general, args.number))
            best[1] = min(best[1], _per_call(new, args.number))
        print(f"{name}: general {best[0]:.2f} µs, new {best[1]:.2f} µs, saved {best[0] - best[1]:.2f} µs")


if __name__ == "__main__":
    main()
