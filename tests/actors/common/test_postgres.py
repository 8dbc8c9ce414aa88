"""The same actors on a real PostgreSQL server (tests/pg.py), and several verifiers on one database.

Registrar essentials run on SQLite and PostgreSQL (``db_url``); the verifier's enrol / monitor /
SIGKILL-restart essentials are in test_durability.py and test_migrations.py, parametrized the
same way. Here: two verifiers with different verifier_id on one PostgreSQL split 10 agents (each
monitors only its own, ``GET ?verifier=ID`` lists them), and an agent moves from one to the other
(DELETE on A + POST on B) with neither restarted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.verifier import records
from tests.actors.registrar_support import SoftTpm, registrar_config, running_registrar
from tests.actors.verifier_support import enrol, enrol_body, new_halves, start_test_agent, start_verifier
from tests.pg import db_url, pg_admin_url, pg_url  # noqa: F401

A = "d432fbb3-d2f1-4a97-9ef7-75bd81c0a000"
B = "d432fbb3-d2f1-4a97-9ef7-75bd81c0b000"


async def test_registrar_enrol_and_restart(tmp_path: Path, pki: Any, db_url: str) -> None:  # noqa: F811
    config = registrar_config(pki, tmp_path / "r", database_url=db_url, database_pool_sz_ovfl="2,1")
    s0, s1 = SoftTpm.new(), SoftTpm.new()
    async with running_registrar(config, pki) as reg:
        async with trio.open_nursery() as n:  # concurrent enrolments through a pool of 3
            n.start_soon(reg.enroll, A, s0)
            n.start_soon(reg.enroll, B, s1)
        rows = await reg.rows()
    async with running_registrar(config, pki) as reg:
        assert await reg.rows() == rows
        rec = (await reg.record(A)).json()["results"]
        assert (rec["regcount"], rec["aik_tpm"]) == (1, s0.aik_tpm)


@pytest.mark.swtpm
async def test_two_verifiers_split_ten_agents_and_move_one(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm_factory: Any, pg_url: str  # noqa: F811
) -> None:
    agents = []
    for i in range(10):
        tpm = await swtpm_factory(fresh=False)  # own TPM each, shared EKs: ids are generated uuids
        agents.append(await start_test_agent(nursery, tmp_path / f"a{i}", pki, tpm.tcti, None))
    opts = {"database_url": pg_url, "quote_interval": 0.5, "database_pool_sz_ovfl": "3,2"}
    va = await start_verifier(nursery, pki, tmp_path / "va", verifier_id="A", **opts)
    vb = await start_verifier(nursery, pki, tmp_path / "vb", verifier_id="B", **opts)
    mine = {"A": {x.agent_id for x in agents[:5]}, "B": {x.agent_id for x in agents[5:]}}
    for i, agent in enumerate(agents):
        await enrol(va if i < 5 else vb, agent.agent_id, enrol_body(agent, v=new_halves().v))
    for agent in agents:
        await va.wait(agent.agent_id, lambda r: r["attestation_count"] >= 2)  # either verifier reads all
    ma, mb = va.verifier.monitors, vb.verifier.monitors
    assert ma is not None and mb is not None
    assert ma.running == mine["A"] and mb.running == mine["B"]  # no overlap, none missing
    for name, v in (("A", va), ("B", vb)):
        listed = (await v.call("GET", f"/agents/?verifier={name}"))["results"]["uuids"]
        assert {x[0] for x in listed} == mine[name]
        bulk = (await vb.call("GET", f"/agents/?verifier={name}&bulk"))["results"]
        assert {r["verifier_id"] for r in bulk.values()} == {name}

    # move agents[0] from A to B: DELETE on A, POST on B; neither verifier restarts
    moved = agents[0]
    before = (await va.get(moved.agent_id))["attestation_count"]
    await va.call("DELETE", f"/agents/{moved.agent_id}")
    assert moved.agent_id not in ma.running
    await enrol(vb, moved.agent_id, enrol_body(moved, v=new_halves().v))
    rec = await vb.wait(moved.agent_id, lambda r: r["attestation_count"] >= 2)
    assert rec["verifier_id"] == "B" and rec["operational_state"] == records.GET_QUOTE
    assert rec["attestation_count"] < before + 2  # a new enrolment: counted from 0 again
    assert ma.running == mine["A"] - {moved.agent_id}
    assert mb.running == mine["B"] | {moved.agent_id}
    listed = (await va.call("GET", "/agents/?verifier=B"))["results"]["uuids"]
    assert moved.agent_id in {x[0] for x in listed}
    await va.stop()
    await vb.stop()
    for agent in agents:
        await agent.run.stop()
