"""A push request's transaction does not wait the store's group linger (Store.write_grouped's
``urgent``; it waits at most Store.urgent_linger, push_commit_linger: 100 ms by default): the linger is for the pull
monitor's success records, which nobody waits for, while a push agent waits on its connection for
the 201 and the 202. A real Verifier actor (SQLite and
PostgreSQL), a software push agent over HTTPS, time on trio's MockClock (it jumps after 0.3 s of
real idleness, so a request that waited the linger would show it as LONG mock seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing
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
