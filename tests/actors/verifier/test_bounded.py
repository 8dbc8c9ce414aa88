"""Flat memory (issue 16 item 4): the verifier's per-agent and per-process objects keep no state
that grows with polls or notices.

Each test drives one object far past any bound (thousands of polls, a backlog of notices several
times the outbox's batch) and inspects every collection attribute of it (:func:`sizes`), so a list
or dict added later that grows per poll or per notice fails here too. The outbox runs on a real
SQLite store against a webhook that refuses connections; its retries, TTL and pruning run on trio's
MockClock (autojump), so hours of backoff take no real time; expired notices leave the database.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import trio

from keytrio.actors.common.store import Store, sqlite_url
from keytrio.actors.verifier.ima import AgentIma, FixedPolicy, ImaHooks
from keytrio.actors.verifier.metrics import VerifierMetrics
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.notify import Outbox, SignedNotice
from keytrio.actors.verifier.schema import deliveries
from keytrio.actors.verifier.schema import notices as notices_table
from keytrio.protocol import ima
from keytrio.protocol.runtime_policy import load_policy, policy_document
from tests.ports import free_port

COLLECTIONS = (list, dict, set, frozenset, tuple, collections.deque, weakref.WeakValueDictionary)


def sizes(obj: object) -> dict[str, int]:
    """The length of every collection held directly by ``obj``."""
    return {name: len(v) for name, v in vars(obj).items() if isinstance(v, COLLECTIONS)}



def count_rows(db: Path, table: sa.Table) -> int:
    engine = sa.create_engine(sqlite_url(db))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)
    finally:
        engine.dispose()


def policy_for(paths: list[str]) -> Any:
    doc = policy_document(meta={"version": 1, "generator": 3},
                          digests={p: [hashlib.sha256(p.encode()).hexdigest()] for p in paths})
    return load_policy(json.dumps(doc).encode())


def test_ima_hook_state_is_flat_over_many_polls() -> None:
    paths = [f"/usr/bin/tool{i}" for i in range(3)]
    entries = [ima.build_entry("ima-ng", p, "sha256", hashlib.sha256(p.encode()).digest()) for p in paths]
    text = "".join(ima.format_line(e) + "\n" for e in entries)
    pcr10 = bytes(32)
    for e in entries:
        pcr10 = hashlib.sha256(pcr10 + ima.extend_digest(e, "sha256")).digest()
    metrics = VerifierMetrics()
    hook = AgentIma("a", FixedPolicy(policy_for(paths)), "p", None, lines_per_poll=metrics.ima_lines_per_poll)

    assert hook(text, 0, {10: pcr10}, "sha256") == ([], 3)  # the whole log once
    for _ in range(100):
        assert hook(None, 3, {10: pcr10}, "sha256") == ([], 3)
    early = sizes(hook)
    for _ in range(20_000):  # ~11 hours of polls at quote_interval 2 s
        hook(None, 3, {10: pcr10}, "sha256")
    assert sizes(hook) == early and max(early.values(), default=0) <= 3, early
    # what tests and operators want to know per poll went to the metric instead
    reg = metrics.metrics.registry
    assert reg.get_sample_value("keytrio_verifier_ima_lines_per_poll_count") == 20_101
    assert reg.get_sample_value("keytrio_verifier_ima_lines_per_poll_sum") == 3


def test_ima_hooks_keep_only_running_monitors() -> None:
    hooks = ImaHooks(FixedPolicy(policy_for(["/bin/x"])))
    live = [hooks({"agent_id": f"a{i}", "runtime_policy_name": "p"}) for i in range(10)]
    for i in range(10, 5_000):  # monitors that ended (nothing holds their hook any more)
        hooks({"agent_id": f"a{i}", "runtime_policy_name": "p"})
    gc.collect()
    assert sorted(hooks.hooks) == sorted(f"a{i}" for i in range(10))
    assert all(hooks.hooks[h.agent_id] is h for h in live if h is not None)
    del live
    gc.collect()
    assert len(hooks.hooks) == 0


async def test_outbox_backlog_stays_bounded(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    batch, notices = 16, 55  # a backlog of more than three batches
    store = await Store.open(sqlite_url(tmp_path / "verifier.sqlite"), migrations=MIGRATIONS)
    metrics = VerifierMetrics()
    outbox = Outbox(store, verifier_id="v", context_for=lambda row: None,  # type: ignore[arg-type,return-value]
                    webhook_url=f"http://127.0.0.1:{free_port()}/hook", retry_interval=0.5,
                    max_retry_interval=4.0, ttl=10.0, clock=autojump_clock.current_time, metrics=metrics, batch=batch)
    peak: dict[str, int] = {}
    t = notices_table
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(outbox.run)
            for i in range(notices):
                await outbox.publish(SignedNotice(f"agent-{i}", f"notice-{i:04d}", "test.event", "{}", ""))

            # No mock-time deadline and no timer-only task here: under autojump the clock jumps
            # to the next deadline whenever every task waits on a SQLite thread, so a hang guard
            # in mock seconds (or a sampler sleeping 0.05 s) fires on a slow machine, not on a
            # hang. The guard counts this loop's rounds instead; the sampling sleeps happen only
            # while this task is not in a thread.
            def sample() -> None:
                for name, n in sizes(outbox).items():
                    peak[name] = max(peak.get(name, 0), n)

            async def settled(count: Any) -> bool:
                for _ in range(120):  # 120 mock seconds in rounds of 1 s (a pass needs ~46 in all)
                    for _ in range(20):
                        sample()
                        await trio.sleep(0.05)
                    if not await count():
                        return True
                return False

            assert await settled(outbox.pending_counts), "deliveries never reached their TTL"
            # and the expired notices leave the database too (one prune per TTL at most)
            assert await settled(lambda: store.read(
                lambda c: c.execute(sa.select(sa.func.count()).select_from(t)).scalar())), "notices never pruned"
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
    # the backlog queued in the database, never in the process: at most one batch in flight
    assert 0 < peak["_inflight"] <= batch, peak
    assert all(n <= batch for n in peak.values()), peak
    assert all(n == 0 for name, n in sizes(outbox).items() if name != "_webhook_ca_files"), sizes(outbox)
    assert count_rows(tmp_path / "verifier.sqlite", deliveries) == 0
    reg = metrics.metrics.registry
    assert reg.get_sample_value("keytrio_verifier_notices_total") == notices
    assert reg.get_sample_value("keytrio_verifier_notice_deliveries_total", {"outcome": "expired"}) == notices
