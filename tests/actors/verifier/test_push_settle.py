"""A steady-state push cycle's verdict inside its evidence transaction (push/verify.py
Verifier.settle): a real Verifier actor (SQLite and PostgreSQL), software push agents (real AK
crypto, quotes, an IMA list really replayed into PCR 10), time on trio's MockClock.

The differentials run one script of cycles against two verifiers on one database (their own
verifier_id and agent): one as shipped, one with ``attestations.settle`` unset, which is the path
every evidence took before (stored as evaluating, 202, then a verification task and a second
transaction for the verdict). What both wrote must be the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
import trio
from trio.testing import MockClock

from keytrio.actors.common.store import sqlite_url
from keytrio.actors.verifier import records
from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.schema import agents, push_sessions
from tests.actors.verifier.push_support import (
    A,
    B,
    SoftAgent,
    enrolled,
    entry,
    start,
    verdict,
    wait_next,
)
from tests.actors.verifier_support import RunningVerifier
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

#: agent row columns a verdict writes (times aside: compared as present / absent)
ROW = ("operational_state", "attestation_count", "next_ima_ml_entry", "ima_progress", "ima_pcr10",
       "tpm_clock_info", "boottime", "hash_alg", "enc_alg", "sign_alg", "last_event_id", "severity_level")
ATT = ("index", "stage", "evaluation", "failure_reason", "failure_event")
BIG = 80  # lines of /usr/bin/ls: > verify.INLINE_IMA_BYTES of IMA text, so verified after the 202


class Runs:
    """Calls of Verifier.run (the verification task) and what settle returned, per index."""

    def __init__(self, rv: RunningVerifier) -> None:
        v = rv.verifier.push.verifier  # type: ignore[union-attr]
        self.tasks: list[tuple[int, bool]] = []  # (index, settled there: a failure)
        run, settle = v.run, v.settle

        async def spy_run(agent_id: str, index: int, accepted: Any = None) -> None:
            self.tasks.append((index, accepted is not None and accepted.settled is not None))
            await run(agent_id, index, accepted)

        v.run = spy_run
        self.settle = settle


async def two(nursery: trio.Nursery, tmp: Path, pki: Any, clock: MockClock, url: str,
              **over: Any) -> tuple[RunningVerifier, RunningVerifier]:
    new = await start(nursery, tmp / "new", pki, clock, database_url=url, verifier_id="new", **over)
    old = await start(nursery, tmp / "old", pki, clock, database_url=url, verifier_id="old", **over)
    old.verifier.push.attestations.settle = None  # type: ignore[union-attr]  # the old two-step path
    return new, old


async def snapshot(rv: RunningVerifier, agent_id: str) -> dict[str, Any]:
    row = await records.get(rv.verifier.store, agent_id)  # type: ignore[arg-type]
    assert row is not None
    atts = await pstore.list_attestations(rv.verifier.store, agent_id)  # type: ignore[arg-type]
    passes = [r for r in atts if r["evaluation"] == pstore.PASS]

    def q(conn: sa.Connection) -> list[float]:
        t = push_sessions.c
        return [r[0] for r in conn.execute(sa.select(t.token_expires_at).where(
            t.agent_id == agent_id, t.token_hash.isnot(None)))]

    expiries = await rv.verifier.store.read(q)  # type: ignore[union-attr]
    return {
        "row": {k: row.get(k) for k in ROW},
        "times": {k: row.get(k) is not None for k in ("last_received_quote", "last_successful_attestation")},
        # (the evidence itself differs: each quote signs its own random challenge)
        "attestations": [{**{k: r.get(k) for k in ATT}, "items": len(r["evidence"] or [])} for r in atts],
        "completed": [r["verification_completed_at"] is not None for r in atts],
        # tokens extended by session_lifetime from the last pass's verdict
        "token_left": [round(e - passes[0]["verification_completed_at"], 3) for e in expiries] if passes else [],
        "notices": [n.event_id for n in await rv.notices(agent_id)],
    }


async def cycle(rv: RunningVerifier, a: SoftAgent, clock: MockClock, **kw: Any) -> tuple[int, Any, dict[str, Any]]:
    index, resp = await a.cycle(**kw)
    assert resp.status_code == 202, resp.text
    done = await verdict(rv, a.agent_id, index)
    await wait_next(clock, resp)
    return index, resp.json(), done


async def test_pass_in_the_evidence_transaction_writes_what_the_two_steps_wrote(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, db_url: str  # noqa: F811
) -> None:
    new, old = await two(nursery, tmp_path, pki, clock, db_url)
    runs = Runs(new)
    a, b = await enrolled(new, pki, A), await enrolled(old, pki, B)
    for n, add in enumerate([[], ["/usr/bin/cat"], [], ["/usr/bin/ls", "/usr/lib/libc.so.6"]]):
        for x in (a, b):
            x.entries += [entry(p) for p in add]
        ia, body_a, done_a = await cycle(new, a, clock)
        ib, body_b, done_b = await cycle(old, b, clock)
        assert ia == ib == n
        # new: the 202 is the verdict, as stored; no verification task ran for it
        attrs = body_a["data"]["attributes"]
        assert (attrs["stage"], attrs["evaluation"]) == ("verification_complete", "pass"), attrs
        assert attrs["verification_completed_at"] == attrs["evidence_received_at"]
        assert body_a["data"] == done_a
        # old: 202 while evaluating, the verdict after it
        assert body_b["data"]["attributes"]["stage"] == "evaluating_evidence"
        assert done_b["attributes"]["evaluation"] == "pass"
        assert body_a["meta"] == body_b["meta"]
    assert runs.tasks == []
    # the IMA hook of the last pass is kept for the next check (once committed), as after a task's
    assert A in new.verifier.push.verifier.states._hooks  # type: ignore[union-attr]
    assert B in old.verifier.push.verifier.states._hooks  # type: ignore[union-attr]
    got, want = await snapshot(new, A), await snapshot(old, B)
    assert got == want
    assert got["row"]["attestation_count"] == 4 and got["row"]["operational_state"] == records.GET_QUOTE
    assert got["row"]["next_ima_ml_entry"] == len(a.entries) == 6 and got["token_left"] == [180.0]
    await new.stop()
    await old.stop()


async def test_failing_steady_state_check_fails_as_before(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, db_url: str  # noqa: F811
) -> None:
    """Tampered IMA (policy_violation) and a forged signature (broken_evidence_chain): the same
    attestation, agent state, event and notice as the two-step path; the 202 says evaluating."""
    for how in ("tampered", "forged"):
        sub = tmp_path / how
        new, old = await two(nursery, sub, pki, clock, db_url)
        runs = Runs(new)
        aid, bid = (A, B) if how == "tampered" else (A.replace("a0", "c0", 1), B.replace("b0", "d0", 1))
        a, b = await enrolled(new, pki, aid), await enrolled(old, pki, bid)
        await cycle(new, a, clock)
        await cycle(old, b, clock)
        kw: dict[str, Any] = {}
        if how == "tampered":
            for x in (a, b):
                x.entries.append(entry("/tmp/evil"))
        else:
            kw = {"forge": True}
        _, body_a, done_a = await cycle(new, a, clock, **kw)
        _, body_b, _ = await cycle(old, b, clock, **kw)
        assert body_a["data"]["attributes"]["stage"] == body_b["data"]["attributes"]["stage"] == "evaluating_evidence"
        assert done_a["attributes"]["evaluation"] == "fail"
        assert runs.tasks == [(1, True)]  # the failure path, with the outcome found in the transaction
        await new.wait_state(aid, records.INVALID_QUOTE)
        await old.wait_state(bid, records.INVALID_QUOTE)
        got, want = await snapshot(new, aid), await snapshot(old, bid)
        assert got == want, how
        reason = "policy_violation" if how == "tampered" else "broken_evidence_chain"
        assert got["attestations"][0]["failure_reason"] == reason and len(got["notices"]) == 1
        # the agent's kept state went with the failure: after reactivation it starts from the row
        assert aid not in new.verifier.push.verifier.states._hooks  # type: ignore[union-attr]
        await new.stop()
        await old.stop()


async def test_large_evidence_and_an_unloaded_policy_stay_asynchronous(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    runs = Runs(rv)
    a = await enrolled(rv, pki)
    a.entries += [entry("/usr/bin/ls")] * BIG  # the first cycle's whole list is large
    _, body, done = await cycle(rv, a, clock)
    assert body["data"]["attributes"]["stage"] == "evaluating_evidence" and done["attributes"]["evaluation"] == "pass"
    assert runs.tasks == [(0, False)]
    # steady state: checked in the transaction
    _, body, _ = await cycle(rv, a, clock)
    assert body["data"]["attributes"]["evaluation"] == "pass" and runs.tasks == [(0, False)]
    # this process has not loaded the agent's runtime policy (as when another worker accepted
    # it): loading needs an await, so the check runs after the 202, and passes
    policies = rv.verifier.policies
    assert policies is not None
    policies._parsed.clear()
    policies._names.clear()
    _, body, done = await cycle(rv, a, clock)
    assert body["data"]["attributes"]["stage"] == "evaluating_evidence" and done["attributes"]["evaluation"] == "pass"
    assert runs.tasks == [(0, False), (2, False)]
    _, body, _ = await cycle(rv, a, clock)  # loaded by then: in the transaction again
    assert body["data"]["attributes"]["evaluation"] == "pass" and len(runs.tasks) == 2
    rec = await records.get(rv.verifier.store, A)  # type: ignore[arg-type]
    assert rec is not None and rec["attestation_count"] == 4 and rec["next_ima_ml_entry"] == len(a.entries)
    await rv.stop()


async def test_stopped_deleted_and_reactivated_agents(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    new, old = await two(nursery, tmp_path, pki, clock, sqlite_url(tmp_path / "shared.sqlite"))
    a, b = await enrolled(new, pki, A), await enrolled(old, pki, B)
    for rv, x in ((new, a), (old, b)):
        await cycle(rv, x, clock)
    # stopped between capabilities and evidence: the evidence is still taken (as before), the
    # attestation passes, the agent stays stopped, its counters untouched
    pending = {}
    for rv, x in ((new, a), (old, b)):
        caps = await x.post_capabilities()
        assert caps.status_code == 201
        pending[x.agent_id] = caps.json()["data"]["attributes"]["evidence_requested"]
        await rv.call("PUT", f"/agents/{x.agent_id}/stop")
    for rv, x in ((new, a), (old, b)):
        resp = await x.send_evidence(x.evidence(pending[x.agent_id]))
        assert resp.status_code == 202, resp.text
        await verdict(rv, x.agent_id, 1)
    got, want = await snapshot(new, A), await snapshot(old, B)
    assert got == want
    assert got["row"]["operational_state"] == records.TENANT_FAILED and got["row"]["attestation_count"] == 1
    # reactivated: the next cycle passes in the transaction from the reset row
    await trio.sleep(2.0)  # the quote interval
    for rv, x in ((new, a), (old, b)):
        await rv.call("PUT", f"/agents/{x.agent_id}/reactivate")
        await cycle(rv, x, clock)
    got, want = await snapshot(new, A), await snapshot(old, B)
    assert got == want and got["row"]["operational_state"] == records.GET_QUOTE
    # deleted between capabilities and evidence: refused (404), nothing written
    caps = await a.post_capabilities()
    assert caps.status_code == 201
    await new.call("DELETE", f"/agents/{A}")
    resp = await a.send_evidence(a.evidence(caps.json()["data"]["attributes"]["evidence_requested"]))
    assert resp.status_code in (401, 403, 404), resp.text
    assert await new.get(A) is None and await pstore.list_attestations(new.verifier.store, A) == []  # type: ignore[arg-type]
    await new.stop()
    await old.stop()


async def test_store_error_in_the_pass_refuses_the_evidence_and_writes_nothing(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    """The pass's write fails (a real SQLite trigger aborts the agent's UPDATE): the evidence
    transaction rolls back whole, the agent gets a 500 (it retries), its attestation still awaits
    evidence; the same evidence sent again once the store works passes, counted once."""
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    await cycle(rv, a, clock)
    store = rv.verifier.store
    assert store is not None

    def trigger(conn: sa.Connection, on: bool) -> None:
        if on:
            conn.execute(sa.text("CREATE TRIGGER boom BEFORE UPDATE OF attestation_count ON "
                                 f"{agents.name} "
                                 "BEGIN SELECT RAISE(ABORT, 'boom'); END"))
        else:
            conn.execute(sa.text("DROP TRIGGER boom"))

    await store.write(lambda conn: trigger(conn, True))
    a.entries.append(entry("/usr/bin/cat"))
    caps = await a.post_capabilities()
    body = a.evidence(caps.json()["data"]["attributes"]["evidence_requested"])
    resp = await a.send_evidence(body)
    assert resp.status_code == 500 and resp.json()["errors"][0]["status"] == "500", resp.text
    latest = await pstore.latest(store, A)
    assert latest is not None and (latest["index"], latest["stage"], latest["evidence"]) == (1, pstore.AWAITING, None)
    rec = await rv.get(A)
    assert rec is not None and rec["attestation_count"] == 1 and rec["operational_state"] == records.GET_QUOTE
    await store.write(lambda conn: trigger(conn, False))
    resp = await a.send_evidence(body)
    assert resp.status_code == 202 and resp.json()["data"]["attributes"]["evaluation"] == "pass", resp.text
    rec = await records.get(store, A)
    assert rec is not None and rec["attestation_count"] == 2 and rec["next_ima_ml_entry"] == len(a.entries)
    await rv.stop()


async def test_restart_leaves_no_small_evidence_unverified_and_resumes_a_large_one(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    # every verification task held back: a small cycle does not need one
    limiter = rv.verifier.push.verifier.limiter  # type: ignore[union-attr]
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for h in holders:
        await limiter.acquire_on_behalf_of(h)
    _, resp = await a.cycle()
    assert resp.status_code == 202 and resp.json()["data"]["attributes"]["evaluation"] == "pass"
    await wait_next(clock, resp)
    assert await pstore.evaluating(rv.verifier.store, "default") == []  # type: ignore[arg-type]
    a.entries += [entry("/usr/bin/ls")] * BIG  # large: verified after the 202, held back here
    _, resp = await a.cycle()
    assert resp.status_code == 202 and resp.json()["data"]["attributes"]["stage"] == "evaluating_evidence"
    assert await pstore.evaluating(rv.verifier.store, "default") == [(A, 1)]  # type: ignore[arg-type]
    await rv.stop()

    rv = await start(nursery, tmp_path, pki, clock)
    host, port = rv.verifier.address  # type: ignore[misc]
    a.base = f"https://{host}:{port}"
    assert (await verdict(rv, A, 1))["attributes"]["evaluation"] == "pass"  # re-read and verified
    await wait_next(clock, resp)
    _, resp = await a.cycle()  # and the next steady-state cycle passes before its 202
    assert resp.json()["data"]["attributes"]["evaluation"] == "pass", resp.text
    rec = await records.get(rv.verifier.store, A)  # type: ignore[arg-type]
    assert rec is not None and rec["attestation_count"] == 3 and rec["next_ima_ml_entry"] == len(a.entries)
    await rv.stop()


async def test_an_error_in_the_check_fails_the_agent_as_before(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    """The check itself raises (here the IMA check factory): fail closed as the task did, the
    agent Failed with internal.verifier.exception and its notice; the evidence stays stored."""
    def broken(row: dict[str, Any]) -> Any:
        raise RuntimeError("no IMA check today")

    url = sqlite_url(tmp_path / "shared.sqlite")
    new, old = await two(nursery, tmp_path, pki, clock, url, ima_check_for=broken)
    runs = Runs(new)
    a, b = await enrolled(new, pki, A), await enrolled(old, pki, B)
    for rv, x in ((new, a), (old, b)):
        index, resp = await x.cycle()
        assert resp.status_code == 202 and resp.json()["data"]["attributes"]["stage"] == "evaluating_evidence"
        assert (await verdict(rv, x.agent_id, index))["attributes"]["evaluation"] == "fail"
        await rv.wait_state(x.agent_id, records.FAILED)
    assert runs.tasks == [(0, True)]
    got, want = await snapshot(new, A), await snapshot(old, B)
    assert got == want and got["row"]["last_event_id"] == "internal.verifier.exception"
    assert got["notices"] == ["internal.verifier.exception"]
    await new.stop()
    await old.stop()
