"""Per-change microbenchmark of 4c.9 (issue 19 item 7): the general path against the new one.

    python -m bench.micro_push_trim [--rounds 5] [--number 20000]

Canned input, this process only, min over rounds of the mean per call (µs), general and new
alternating within each round:

- the TPM clock of one passed check: the row's ``tpm_clock_info`` parsed (``json.loads`` +
  ``ClockInfo.from_json``) and the new clock's text written (``json.dumps(to_json(),
  sort_keys=True)`` by the kept encoder), against EvalStates.previous_clock (the text the previous
  pass wrote, kept) and EvalStates.clock_text (a fresh clock each call, as each quote has);
- the cycle's gate reads (push/store.py on a real SQLite file, lean path, one open transaction):
  session_row + agent_row against session_and_agent (once per request, two per attestation);
- a settled pass's attestation writes: an attestation inserted (in both, its cost included), then
  set_evidence + complete against set_evidence(completed=) (once per attestation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.push import verify
from keytrio.actors.verifier.push.evalstate import EvalStates
from keytrio.actors.verifier.schema import agents, metadata, push_sessions
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

    tmp = tempfile.TemporaryDirectory()
    engine = sa.create_engine(f"sqlite:///{Path(tmp.name) / 'micro.db'}")
    metadata.create_all(engine)
    row: dict[str, object] = {c.name: None for c in agents.c}
    row.update(agent_id=agent, v="v", tpm_policy="{}", accept_tpm_hash_algs='["sha256"]',
               accept_tpm_encryption_algs='["rsa"]', accept_tpm_signing_algs='["rsassa"]', ak_tpm="ak" * 200,
               operational_state=3, verifier_id="default", attestation_count=5, v_delivered=False,
               supported_version="3.0", enrolled_at=1.0, meta_data="{}")
    for c in agents.c:  # the other required columns: any value of their type
        if row[c.name] is None and not c.nullable:
            row[c.name] = 0 if isinstance(c.type, sa.Integer | sa.Float) else False if isinstance(
                c.type, sa.Boolean) else ""
    with engine.begin() as c:
        c.execute(sa.insert(agents).values(**row))
        c.execute(sa.insert(push_sessions).values(
            session_id="s" * 32, agent_id=agent, challenge="n" * 24, challenges_expire_at=10.0, created_at=1.0,
            token_hash="h" * 64, token_expires_at=5e9, response_received_at=2.0))
    conn = engine.connect()
    conn.begin()
    last: list[dict[str, object] | None] = [None]
    values = {"agent_id": agent, "stage": pstore.AWAITING, "evaluation": pstore.PENDING, "challenge": "c" * 24,
              "hash_alg": "sha256", "evidence_requested": [{"evidence_type": "tpm_quote"}],
              "capabilities": [{"caps": True}], "system_info": {"boot_time": None},
              "capabilities_received_at": 1.0, "challenges_expire_at": 100.0}
    evidence = [{"evidence_class": "certification", "data": {"message": "m" * 200, "signature": "s" * 344}}]

    def insert() -> int:
        index = pstore.insert_attestation(conn, values, last[0], history=1 << 40)  # type: ignore[arg-type]
        last[0] = {"index": index}
        return index

    def writes_general() -> None:
        index = insert()
        pstore.set_evidence(conn, agent, index, evidence, 5.0)
        pstore.complete(conn, agent, index, evaluation=pstore.PASS, now=5.0)

    def writes_new() -> None:
        pstore.set_evidence(conn, agent, insert(), evidence, 5.0, completed=pstore.completed(pstore.PASS, 5.0))

    cases = [
        ("the stored TPM clock of one passed check (read + write)", clock_general, clock_new),
        ("the gate's reads of one request (session, agent)",
         lambda: (pstore.session_row(conn, "s" * 32), pstore.agent_row(conn, agent)),
         lambda: pstore.session_and_agent(conn, "s" * 32, agent)),
        ("a settled pass's attestation writes (+ an insert in both)", writes_general, writes_new),
    ]
    for name, general, new in cases:
        best = [float("inf"), float("inf")]
        for _ in range(args.rounds):
            best[0] = min(best[0], _per_call(general, args.number))
            best[1] = min(best[1], _per_call(new, args.number))
        print(f"{name}: general {best[0]:.2f} µs, new {best[1]:.2f} µs, saved {best[0] - best[1]:.2f} µs")
    conn.rollback()
    conn.close()
    engine.dispose()
    tmp.cleanup()


if __name__ == "__main__":
    main()
