"""Revocation actions run on every machine when one fails.

Story: three machines are enrolled with the CA's revocation key; each agent trusts the CA's
RevocationNotifier certificate and has a recording revocation action. Machine m1 is enrolled with
a tpm_policy on PCR 15, and PCR 15 changes on it. The verifier marks m1 Invalid Quote and sends a
notice, signed with m1's revocation key, to every agent it attests - m1 included. Each agent
checks the signature against its RevocationNotifier cert and runs its actions.
Expected verdict: m1 Invalid Quote (``pcr_validation.invalid_pcr_15``); m0, m1 and m2 each ran
their actions once for a notice about m1 with that event id; m0 and m2 stay in Get Quote.
"""

from __future__ import annotations

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE

EVENT = "pcr_validation.invalid_pcr_15"
NOTICE = (("m1", EVENT),)
EXPECT = {
    "m0": Expect(events=(), notices=NOTICE, final=GET_QUOTE),
    "m1": Expect(events=(EVENT,), notices=NOTICE, states=(GET_QUOTE, INVALID_QUOTE), final=INVALID_QUOTE),
    "m2": Expect(events=(), notices=NOTICE, final=GET_QUOTE),
}


@scenario("revocation-all", expect=EXPECT)
async def revocation_all(run: Run) -> None:
    async with run.testbed(machines=3) as tb:
        m0, m1, m2 = tb.machines
        async with run.step("enrol three machines (m1 with PCR 15 in its tpm_policy)"):
            await tb.enrol(m0)
            value = (await m1.read_pcrs("sha256", [15]))[15].hex()
            await tb.enrol(m1, tpm_policy={"15": [value]})
            await tb.enrol(m2)
            for m in tb.machines:
                await tb.wait_count(m, 2)

        async with run.step("PCR 15 changes on m1: Invalid Quote"):
            await m1.extend_data(15, b"tampered")
            rec = await tb.wait_state(m1, INVALID_QUOTE)
            run.note(f"m1 event {rec['last_event_id']}")

        async with run.step("every machine ran its revocation actions for the signed notice about m1"):
            for m in tb.machines:
                notices = await tb.wait_notices(m, 1)
                run.check(notices[0]["agent_id"] == m1.agent_id, f"{m.name}: notice about {notices[0]['agent_id']}")
                run.note(f"{m.name}: {notices[0]['event_id']} about m1 ({notices[0]['severity_label']})")
            for m in (m0, m2):
                await tb.wait_count(m, (await tb.get(m) or {})["attestation_count"] + 1)
