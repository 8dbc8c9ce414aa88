"""IMA: a file of the runtime policy is measured with the wrong digest; the verifier fails it.

Story: as in ima-outside-policy (inline runtime policy built from the machine's own IMA log, PCR 10
in the mask), then ``/usr/bin/tool1`` is measured again with other contents (a trojaned build).
Expected verdict: Get Quote, then Invalid Quote with ``ima.validation.ima-ng.runtime_policy_hash``,
and a signed notice about the machine on the machine.
"""

from __future__ import annotations

from keytrio.scenarios.ima_support import WRONG_DIGEST, enrolled, failing
from keytrio.scenarios.runner import Run, scenario
from keytrio.testbed.world import INVALID_QUOTE


@scenario("ima-wrong-digest", expect=failing(WRONG_DIGEST))
async def ima_wrong_digest(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        await enrolled(run, tb, m)
        async with run.step("measure /usr/bin/tool1 with other contents: Invalid Quote"):
            await m.measure("/usr/bin/tool1", b"a trojaned build of tool1\n")
            rec = await tb.wait_state(m, INVALID_QUOTE)
            run.note(f"event {rec['last_event_id']}")
            await tb.wait_notices(m, 1)
