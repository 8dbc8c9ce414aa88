"""IMA: a file outside the runtime policy is measured; the verifier fails the machine.

Story: the machine measures a few files (seeded contents); the tenant enrols it with an inline
runtime policy built from its own IMA log (every measured path with its digest, plus
``excludes: ["^/tmp/"]``) and PCR 10 in the mask. The verifier replays each poll's new IMA lines
against the quoted PCR 10 and checks them against the policy. Then ``/usr/bin/intruder`` is
measured.
Expected verdict: Get Quote, then Invalid Quote with ``ima.validation.ima-ng.not_in_allowlist``,
and a signed notice about the machine on the machine.
"""

from __future__ import annotations

from keytrio.scenarios.ima_support import NOT_IN_ALLOWLIST, enrolled, failing
from keytrio.scenarios.runner import Run, scenario
from keytrio.testbed.world import INVALID_QUOTE


@scenario("ima-outside-policy", expect=failing(NOT_IN_ALLOWLIST))
async def ima_outside_policy(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        await enrolled(run, tb, m)
        async with run.step("measure /usr/bin/intruder (not in the policy): Invalid Quote"):
            await m.measure("/usr/bin/intruder")
            rec = await tb.wait_state(m, INVALID_QUOTE)
            run.note(f"event {rec['last_event_id']}")
            await tb.wait_notices(m, 1)
