"""Named runtime policies across verifier processes that share one database (PolicyStore.refresh).

Two PolicyStores over two Store handles on one SQLite file stand for two verifier processes:
what one writes, the other serves after its next refresh; a refresh never undoes a local write.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from keytrio.actors.common.store import Store, sqlite_url
from keytrio.actors.verifier.metrics import VerifierMetrics
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.policies import PolicyStore
from keytrio.protocol.runtime_policy import policy_document


def raw_policy(*digests: str) -> bytes:
    return json.dumps(policy_document(meta={"version": 1, "generator": 3},
                                      digests={"/usr/bin/x": list(digests)})).encode()


def parse_count(p: PolicyStore) -> float:
    assert p.parses is not None
    [sample] = [s for m in p.parses.collect() for s in m.samples if s.name.endswith("_total")]
    return sample.value


async def two_verifiers(tmp_path: Path) -> tuple[Store, Store, PolicyStore, PolicyStore]:
    url = sqlite_url(tmp_path / "shared.sqlite")
    sa_, sb = await Store.open(url, migrations=MIGRATIONS), await Store.open(url, migrations=MIGRATIONS)
    a = PolicyStore(sa_, parses=VerifierMetrics().policy_parses)
    b = PolicyStore(sb, parses=VerifierMetrics().policy_parses)
    await a.load()
    await b.load()
    return sa_, sb, a, b


async def test_named_policy_writes_reach_the_other_verifier(tmp_path: Path) -> None:
    sa_, sb, a, b = await two_verifiers(tmp_path)
    try:
        one, two = raw_policy("aa" * 32), raw_policy("bb" * 32)
        p1 = await a.accept(one, None)
        await a.save_named("base", one, p1, None, None, create=True)
        assert b.by_name("base") is None  # not yet seen by b
        assert await b.refresh() is True
        assert b.by_name("base") is not None and b.by_name("base").checksum == p1.checksum
        parses = parse_count(b)
        assert await b.refresh() is False and parse_count(b) == parses  # nothing new: nothing parsed

        p2 = await a.accept(two, None)
        await a.save_named("base", two, p2, None, None, create=False)  # PUT through a
        await b.refresh()
        assert b.by_name("base").checksum == p2.checksum
        assert b.by_checksum(p1.checksum) is None  # the replaced policy row was collected by a

        await a.delete_named("base")  # DELETE through a
        await b.refresh()
        assert b.by_name("base") is None and b.names() == []
    finally:
        await sa_.close()
        await sb.close()


async def test_refresh_never_undoes_a_local_write(tmp_path: Path) -> None:
    sa_, sb, a, b = await two_verifiers(tmp_path)
    try:
        one = raw_policy("cc" * 32)
        p1 = await b.accept(one, None)
        results: list[bool] = []
        async with trio.open_nursery() as n:
            n.start_soon(lambda: b.save_named("mine", one, p1, None, None, create=True))
            for _ in range(20):  # refreshes racing the local POST
                n.start_soon(lambda: _refresh_into(b, results))
        assert b.by_name("mine") is not None  # whatever the interleaving, the POST stands
        await b.refresh()
        assert b.by_name("mine") is not None and a.by_name("mine") is None
        await a.refresh()
        assert a.by_name("mine").checksum == p1.checksum
    finally:
        await sa_.close()
        await sb.close()


async def _refresh_into(store: PolicyStore, results: list[bool]) -> None:
    results.append(await store.refresh())
