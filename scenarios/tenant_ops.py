"""Tenant operations: stop, reactivate, delete and re-add an agent.

Story: one machine is enrolled and attested. The tenant stops it (PUT stop): the verifier ends
polling and reports Tenant Quote Failed; the attestation count stays put. Reactivate: polling
starts again (Get Quote, V provided again). Delete: the verifier forgets the agent (404). Re-add
with the tenant: a fresh K/U/V bootstrap, the agent proves the new K, attestation resumes.
Expected verdict: Get Quote -> Tenant Quote Failed -> Get Quote -> Absent -> Get Quote; no
failure event and no revocation notice (tenant actions are not failures).
"""

from __future__ import annotations

import trio

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.observe import GONE
from keytrio.testbed.world import GET_QUOTE, TENANT_FAILED

EXPECT = {"m0": Expect(events=(), notices=(), states=(GET_QUOTE, TENANT_FAILED, GET_QUOTE, GONE, GET_QUOTE),
                       final=GET_QUOTE)}


@scenario("tenant-ops", expect=EXPECT)
async def tenant_ops(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        t = tb.tenant
        assert t is not None
        async with run.step("enrol and attest"):
            await tb.enrol(m)
            await tb.wait_count(m, 2)

        async with run.step("tenant stop: Tenant Quote Failed, polling ends"):
            await t.stop(m.agent_id)
            rec = await tb.wait_state(m, TENANT_FAILED)
            count = rec["attestation_count"]
            await trio.sleep(0.8)  # four quote intervals: a live monitor would have counted
            rec = await tb.get(m) or {}
            run.check(rec.get("attestation_count") == count,
                      f"attestation_count moved after stop: {count} -> {rec.get('attestation_count')}")
            run.note(f"attestation_count stays {count}")

        async with run.step("tenant reactivate: Get Quote again"):
            await t.reactivate(m.agent_id)
            rec = await tb.wait_count(m, count + 2)
            run.note(f"attestation_count {count} -> {rec['attestation_count']}")

        async with run.step("tenant delete: the verifier forgets the agent"):
            await t.delete(m.agent_id)
            await tb.wait_gone(m)
            run.check(m.agent_id not in await t.list(), "still listed")

        async with run.step("tenant add again: new K proven, attestation resumes"):
            res = await tb.enrol(m)
            run.check(res.verified, "K not proven")
            rec = await tb.wait_count(m, 2)
            run.note(f"attestation_count {rec['attestation_count']} after the re-add")
