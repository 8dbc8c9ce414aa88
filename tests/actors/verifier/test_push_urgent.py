"""A push request's transaction does not wait the store's group linger (Store.write_grouped's
``urgent``; it waits at most Store.urgent_linger, push_commit_linger: 100 ms by default): the linger is for the pull
monitor's success records, which nobody waits for, while a push agent waits on its connection for
the 201 and the 202. A real Verifier actor (SQLite and
PostgreSQL), a software push agent over HTTPS, time on trio's MockClock (it jumps after 0.3 s of
real idleness, so a request that waited the linger would show it as LONG mock seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from tests.actors.verifier.push_support import enrolled, start
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

LONG = 10.0  # the linger set here: longer than any request of this test takes


async def test_capabilities_and_evidence_answer_without_waiting_the_linger(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, db_url: str  # noqa: F811
) -> None:
    rv = await start(nursery, tmp_path, pki, clock, database_url=db_url)
    store = rv.verifier.store
    assert store is not None
    assert store.group_linger == 0.25  # commit_linger auto: min(0.25, quote_interval / 8), pull records
    assert store.urgent_linger == 0.1  # push_commit_linger auto: min(0.1, quote_interval / 20), requests
    store.group_linger = LONG
    a = await enrolled(rv, pki)

    async def background() -> Any:
        """A background write lingering in the committer (as a pull success record would)."""
        job = store.submit_grouped(lambda conn: 1, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert store._committing and store._busy and not job.done
        return job

    job = await background()
    before = trio.current_time()
    caps = await a.post_capabilities()
    assert caps.status_code == 201, caps.text
    after_caps = trio.current_time()
    assert after_caps - before < LONG
    assert job.done and await store.collect(job) == 1  # it went in the 201's group

    job = await background()
    requested = caps.json()["data"]["attributes"]["evidence_requested"]
    resp = await a.send_evidence(a.evidence(requested))
    assert resp.status_code == 202, resp.text
    assert resp.json()["data"]["attributes"]["evaluation"] == "pass"
    assert trio.current_time() - after_caps < LONG
    assert job.done and await store.collect(job) == 1
    await rv.stop()


async def store_counts(address: tuple[str, int] | None) -> dict[str, float]:
    """The store counters of the verifier's ``GET /metrics`` (Prometheus text over HTTP):
    ``commits <kind>`` and ``writes <kind>``."""
    assert address is not None
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"http://{address[0]}:{address[1]}/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name in ("keytrio_verifier_store_commits_total", "keytrio_verifier_store_writes_total"):
                out[f"{s.name.split('_')[3]} {s.labels['kind']}"] = s.value
    return out


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


async def test_metrics_count_the_groups_a_push_request_cuts_short(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, db_url: str  # noqa: F811
) -> None:
    """mode = both: a lingering background write (as a pull success record) taken along by the
    201's and by the 202's urgent write is a mixed group each time, a lone urgent write an urgent
    group, background writes lingering together one background group; /metrics carries each."""
    rv = await start(nursery, tmp_path, pki, clock, database_url=db_url, mode="both")
    store = rv.verifier.store
    assert store is not None
    store.group_linger = LONG
    at = rv.verifier.metrics_address
    start_counts = await store_counts(at)
    assert set(start_counts) == {"commits background", "commits urgent", "commits mixed",
                                 "writes background", "writes urgent"}
    a = await enrolled(rv, pki)

    before = await store_counts(at)
    job = store.submit_grouped(lambda conn: 1, nursery)  # lingers in the committer
    await trio.testing.wait_all_tasks_blocked()
    caps = await a.post_capabilities()
    assert caps.status_code == 201, caps.text
    assert job.done
    counts = await store_counts(at)
    assert grew(before, counts) == {"commits mixed": 1, "writes background": 1, "writes urgent": 1}

    requested = caps.json()["data"]["attributes"]["evidence_requested"]
    before = counts
    resp = await a.send_evidence(a.evidence(requested))  # alone: an urgent group
    assert resp.status_code == 202 and resp.json()["data"]["attributes"]["evaluation"] == "pass", resp.text
    counts = await store_counts(at)
    assert grew(before, counts) == {"commits urgent": 1, "writes urgent": 1}

    before = counts
    async with trio.open_nursery() as inner:  # three background writes: one group, after LONG
        jobs = [store.submit_grouped(lambda conn: 1, inner) for _ in range(3)]
    assert all(j.done for j in jobs)
    counts = await store_counts(at)
    assert grew(before, counts) == {"commits background": 1, "writes background": 3}
    assert counts["writes urgent"] == store.writes_urgent >= 2
    await rv.stop()
