"""records.record_success writes each value into its own column, whichever optional columns a
poll sets (its statement and parameter order are cached per set): on real SQLite (positional
parameters) and PostgreSQL (named ones), every optional column alone, all, none and random sets,
read back row by row."""

from __future__ import annotations

import json
import random
from typing import Any

import sqlalchemy as sa

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.monitor import ACTIVE_STATES
from keytrio.actors.verifier.schema import agents as agents_table
from keytrio.protocol.quote import ClockInfo
from tests.actors.verifier.cluster_support import agent_row
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

OPTIONAL = ("hash_alg", "enc_alg", "sign_alg", "next_ima_ml_entry", "ima_pcr10", "ima_progress", "boottime",
            "clock_info", "state")


def _values(i: int) -> dict[str, Any]:
    """Distinct values per call, so a value written into another column shows."""
    return {"hash_alg": f"h{i}", "enc_alg": f"e{i}", "sign_alg": f"s{i}", "next_ima_ml_entry": 1000 + i,
            "ima_pcr10": {"sha256": f"{i:064x}"}, "ima_progress": f'{{"p": {i}}}', "boottime": 2000 + i,
            "clock_info": ClockInfo(3000 + i, i, i + 1, 1),
            "state": records.GET_QUOTE if i % 2 else records.PROVIDE_V}


def _columns(kw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in kw.items():
        if name == "ima_pcr10":
            out["ima_pcr10"] = json.dumps(value, sort_keys=True)
        elif name == "clock_info":
            out["tpm_clock_info"] = value.json_text()
        elif name == "state":
            out["operational_state"] = value
        else:
            out[name] = value
    return out


async def test_every_set_of_columns_lands_in_its_columns(db_url: str) -> None:  # noqa: F811
    store = await Store.open(db_url, migrations=MIGRATIONS, pool_size=2)
    try:
        await store.write(lambda conn: conn.execute(sa.insert(agents_table), [agent_row("a1"), agent_row("a2")]))
        rng = random.Random(7)
        sets = [(), OPTIONAL, *((name,) for name in OPTIONAL)]
        sets += [tuple(n for n in OPTIONAL if rng.random() < 0.5) for _ in range(24)]
        for i, chosen in enumerate(sets, start=1):
            for states in (None, ACTIVE_STATES,
                           frozenset({records.GET_QUOTE, records.PROVIDE_V})):
                before = await records.get(store, "a1")
                other = await records.get(store, "a2")
                assert before is not None
                kw = {name: _values(i)[name] for name in chosen}
                now = 1_700_000_000.0 + i
                assert await records.record_success(store, "a1", now=now, only_in_states=states, **kw)
                after = await records.get(store, "a1")
                assert after is not None
                want = {**before, **_columns(kw), "last_received_quote": int(now),
                        "last_successful_attestation": int(now),
                        "attestation_count": before["attestation_count"] + 1}
                assert after == want, chosen
                assert await records.get(store, "a2") == other  # the WHERE names one agent
        # the state guard: a row in another state is not written
        await store.write(lambda conn: conn.execute(
            sa.update(agents_table).where(agents_table.c.agent_id == "a1").values(operational_state=records.FAILED)))
        before = await records.get(store, "a1")
        assert not await records.record_success(store, "a1", now=1.0, only_in_states=frozenset({records.GET_QUOTE}),
                                                **_values(99))
        assert await records.get(store, "a1") == before
    finally:
        await store.close()
