"""Policy PCR changed: a PCR named in the tpm_policy changes, the verifier flags the quote.

Story: one machine is enrolled with a tpm_policy that pins PCR 15 (sha256) to its current value
(all zeros after boot). It is attested a few times. Then something on the machine extends PCR 15
(as a changed kernel command line or configuration would change a measured PCR).
Expected verdict: Get Quote, then Invalid Quote with event ``pcr_validation.invalid_pcr_15``;
the machine's agent receives and verifies the signed revocation notice about itself.
"""

from __future__ import annotations

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE

EVENT = "pcr_validation.invalid_pcr_15"
EXPECT = {"m0": Expect(events=(EVENT,), notices=(("m0", EVENT),), states=(GET_QUOTE, INVALID_QUOTE),
                       final=INVALID_QUOTE)}


@scenario("policy-pcr-changed", expect=EXPECT)
async def policy_pcr_changed(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        async with run.step("enrol with tpm_policy PCR 15 = its current sha256 value"):
            value = (await m.read_pcrs("sha256", [15]))[15].hex()
            await tb.enrol(m, tpm_policy={"15": [value]})
            await tb.wait_count(m, 3)
            run.note(f"PCR 15 = {value[:16]}...; three good quotes")

        async with run.step("extend PCR 15 on the machine"):
            await m.extend_data(15, b"changed configuration")

        async with run.step("the verifier marks the quote invalid (PCR 15) and notifies"):
            rec = await tb.wait_state(m, INVALID_QUOTE)
            run.note(f"event {rec['last_event_id']}, severity level {rec['severity_level']}")
            notices = await tb.wait_notices(m, 1)
            run.check(notices[0]["agent_id"] == m.agent_id, "notice about another agent")
