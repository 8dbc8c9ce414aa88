"""IMA: a file under an excluded path is measured; the verifier ignores it.

Story: as in ima-outside-policy (inline runtime policy built from the machine's own IMA log with
``excludes: ["^/tmp/"]``, PCR 10 in the mask), then ``/tmp/scratch`` - in no digest list - is
measured with arbitrary contents.
Expected verdict: Get Quote throughout, attestation continues (the PCR 10 replay still includes
the excluded line), no event, no notice.
"""

from __future__ import annotations

from keytrio.scenarios.ima_support import enrolled
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE


@scenario("ima-excluded-path", expect={"m0": Expect(events=(), notices=(), final=GET_QUOTE)})
async def ima_excluded_path(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        count = await enrolled(run, tb, m)
        async with run.step("measure /tmp/scratch (excluded): attestation continues"):
            await m.measure("/tmp/scratch")  # noqa: S108 (a path on the simulated machine)
            rec = await tb.wait_count(m, count + 4)
            run.check(rec["last_event_id"] in (None, ""), f"event {rec['last_event_id']}")
            run.note(f"attestation_count {count} -> {rec['attestation_count']}")
