"""Push agents under leases end to end: two real verifiers (mTLS, PostgreSQL, cluster = true,
mode = push) share a push agent that attests to the instance NOT holding its lease. The holder's
deadline re-reads what the other recorded, so the agent is never failed while it attests; once
silent it is failed once, with one notice. Time on the `clock` fixture (MockClock, autojump after
0.3 s of real idleness: the database threads finish first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from trio.testing import MockClock

from keytrio.actors.verifier import records
from keytrio.actors.verifier.push.verify import TIMEOUT
from tests.actors.verifier.push_support import (
    PATHS,
    A,
    agent,
    entry,
    policy_for,
    push_enrol_body,
    verdict,
    wait_next,
)
from tests.actors.verifier_support import start_verifier
from tests.pg import pg_admin_url, pg_url  # noqa: F401


async def test_push_agent_attesting_to_the_non_holder_is_kept_then_failed_once(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, pg_url: str  # noqa: F811
) -> None:
    opts: dict[str, Any] = {"mode": "push", "quote_interval": 2.0, "database_url": pg_url, "cluster": True,
                            "lease_ttl": 6.0, "verifier_id": "cluster", "database_pool_sz_ovfl": "3,2"}
    va = await start_verifier(nursery, pki, tmp_path / "va", clock=clock.current_time, **opts)
    vb = await start_verifier(nursery, pki, tmp_path / "vb", clock=clock.current_time, **opts)
    await va.call("POST", f"/agents/{A}", push_enrol_body("rsa"))
    ta, tb = (rv.verifier.cluster.push for rv in (va, vb))  # type: ignore[union-attr]
    assert ta is not None and tb is not None
    with trio.fail_after(60):  # mock seconds: a hang guard
        while not (A in ta.running or A in tb.running):
            await trio.sleep(0.5)
    (_, t_holder), (other, t_other) = ((va, ta), (vb, tb)) if A in ta.running else ((vb, tb), (va, ta))
    assert A not in t_other.running
    a = agent(other, pki)  # attests to the instance that does not hold its lease
    assert (await a.open_session()).status_code == 200
    start = trio.current_time()
    while trio.current_time() < start + 40.0:  # four times maximum_attestation_interval (10 s)
        _, resp = await a.cycle()
        assert resp.status_code == 202, resp.text
        await wait_next(clock, resp)
        for rv in (va, vb):  # evidence arrival arms no deadline anywhere; only the holder's timer
            assert rv.verifier.push.deadlines.armed == set()  # type: ignore[union-attr]
    assert (await other.get(A))["operational_state"] == records.GET_QUOTE  # type: ignore[index]
    assert t_holder.deadlines.armed == {A} and t_other.deadlines.armed == set()
    # silent: the holder fails it, once, with one notice
    with trio.fail_after(60):
        while (rec := await other.get(A))["operational_state"] != records.FAILED:  # type: ignore[index]
            await trio.sleep(1.0)
    assert rec["last_event_id"] == TIMEOUT  # type: ignore[index]
    await trio.sleep(20.0)
    assert [n.event_id for n in await va.notices(A)] == [TIMEOUT]
    await va.stop()
    await vb.stop()


async def test_evidence_taken_by_an_instance_that_did_not_accept_the_inline_policy_is_judged_by_it(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, pg_url: str  # noqa: F811
) -> None:
    """The inline runtime policy arrives with the enrolment at va; the agent sends its evidence to
    vb, which never saw that policy: vb loads it from the database before judging (else the agent
    would fail with ima.policy_missing until some refresh that inline policies do not get)."""
    opts: dict[str, Any] = {"mode": "push", "quote_interval": 2.0, "database_url": pg_url, "cluster": True,
                            "lease_ttl": 6.0, "verifier_id": "cluster", "database_pool_sz_ovfl": "3,2"}
    va = await start_verifier(nursery, pki, tmp_path / "va", clock=clock.current_time, **opts)
    vb = await start_verifier(nursery, pki, tmp_path / "vb", clock=clock.current_time, **opts)
    await va.call("POST", f"/agents/{A}", push_enrol_body("rsa", policy_for(PATHS)))
    a = agent(vb, pki)
    assert (await a.open_session()).status_code == 200
    for _ in range(2):
        index, resp = await a.cycle()
        assert resp.status_code == 202, resp.text
        done = await verdict(vb, A, index)
        assert done["attributes"]["evaluation"] == "pass", done
        await wait_next(clock, resp)
    a.entries.append(entry("/tmp/evil"))  # and the policy is really applied there
    index, resp = await a.cycle()
    done = await verdict(vb, A, index)
    assert done["attributes"]["evaluation"] == "fail", done
    await va.stop()
    await vb.stop()
