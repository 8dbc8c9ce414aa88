"""Push agents' liveness and durability: the event-driven deadline (mock seconds) fails a silent
agent after maximum_attestation_interval and stages its revocation notice; a restarted verifier
keeps sessions, history and deadlines, and verifies evidence it had accepted but not verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from trio.testing import MockClock

from keytrio.actors.verifier import records
from keytrio.actors.verifier.push.verify import TIMEOUT
from tests.actors.verifier.push_support import A, B, enrolled, entry, start, verdict, wait_next


async def wait_failed(rv: Any, agent_id: str) -> dict[str, Any]:
    """Poll the record once per mock second (the deadline is what moves the clock)."""
    with trio.fail_after(600):
        while (rec := await rv.get(agent_id))["operational_state"] != records.FAILED:
            await trio.sleep(1.0)
    return rec


async def test_silent_agent_is_failed_after_the_interval_with_a_notice(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock, quote_interval=4.0)  # maximum interval: 20 s
    a = await enrolled(rv, pki)
    b = await enrolled(rv, pki, B, "rsa2")
    _, resp = await a.cycle()
    assert resp.status_code == 202
    sent = trio.current_time()
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    # B keeps attesting every interval: its deadline keeps moving, it never fails
    for _ in range(8):
        _, resp_b = await b.cycle()
        assert resp_b.status_code == 202
        await wait_next(clock, resp_b)
        if (await rv.get(A))["operational_state"] == records.FAILED:  # type: ignore[index]
            break
    rec = await wait_failed(rv, A)
    failed_at = trio.current_time()
    assert rec["last_event_id"] == TIMEOUT
    assert 20.0 <= failed_at - sent <= 24.0 + 1.0, failed_at - sent  # the deadline, within B's cadence
    notices = await rv.notices(A)
    assert [n.event_id for n in notices] == [TIMEOUT]
    assert (await rv.get(B))["operational_state"] == records.GET_QUOTE  # type: ignore[index]
    assert rv.verifier.push.deadlines.deadline(A) is None  # type: ignore[union-attr]
    v25 = (await rv.admin.get(rv.url.replace("v2.1", "v2.5") + f"/agents/{A}")).json()["results"]
    assert v25["attestation_status"] == "TIMEOUT"  # upstream's status for it
    err = await a.post_capabilities()
    assert err.status_code == 403
    # the tenant reactivates: a fresh interval, attestations accepted again
    await rv.call("PUT", f"/agents/{A}/reactivate")
    assert (await a.post_capabilities()).status_code == 201
    await rv.stop()


async def test_enrolled_agent_that_never_attests_fails_too(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock, quote_interval=2.0)
    start_at = trio.current_time()
    await enrolled(rv, pki)
    rec = await wait_failed(rv, A)
    assert rec["last_event_id"] == TIMEOUT and trio.current_time() - start_at >= 10.0
    await rv.stop()


async def test_restart_keeps_sessions_history_and_unverified_evidence(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock, quote_interval=2.0)
    a = await enrolled(rv, pki)
    _, resp = await a.cycle()
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    await wait_next(clock, resp)
    # evidence accepted (202) but held back from verification, then the verifier stops (large
    # evidence: a steady-state cycle's verdict is written before its 202)
    a.entries += [entry("/usr/bin/ls")] * 80
    limiter = rv.verifier.push.verifier.limiter  # type: ignore[union-attr]
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for h in holders:
        await limiter.acquire_on_behalf_of(h)
    _, resp = await a.cycle()
    assert resp.status_code == 202
    await rv.stop()
    clock.jump(100.0)  # down far longer than the 10 s interval: the agent could not reach it

    rv = await start(nursery, tmp_path, pki, clock, quote_interval=2.0)
    host, port = rv.verifier.address  # type: ignore[misc]
    a.base = f"https://{host}:{port}"
    done = await verdict(rv, A, 1)  # resumed at start-up
    assert done["attributes"]["evaluation"] == "pass", done
    rec = await rv.get(A)
    assert rec is not None and rec["attestation_count"] == 2
    assert rec["operational_state"] == records.GET_QUOTE  # the downtime did not count against it
    # the token issued before the restart still works; the history is still there
    await wait_next(clock, resp)
    listed = await a.request("GET", f"/agents/{A}/attestations")
    assert [d["id"] for d in listed.json()["data"]] == ["1", "0"]
    index, resp = await a.cycle()
    assert (index, resp.status_code) == (2, 202)
    assert (await verdict(rv, A, 2))["attributes"]["evaluation"] == "pass"
    # ... and so does its deadline: silent from here, it fails after the interval
    rec = await wait_failed(rv, A)
    assert rec["last_event_id"] == TIMEOUT
    await rv.stop()
