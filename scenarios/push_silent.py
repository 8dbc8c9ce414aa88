"""Push agent silent: its uplink is cut; after ``maximum_attestation_interval`` the verifier fails it.

Story: a push machine behind a NAT is enrolled and passes. Its NAT's uplink is cut (outbound
connections reset): the agent keeps trying with backoff, nothing reaches the verifier. The verifier
never dials out; its per-agent deadline (``maximum_attestation_interval`` = 5 x quote_interval,
5 s here) expires and it marks the agent Failed with ``internal.verifier.attestation_timeout``,
storing the revocation notice. Not before: the agent is still in Get Quote one quote interval after
the cut.
Expected verdict: Get Quote, then Failed (``internal.verifier.attestation_timeout``); the notice
stored in the verifier's outbox; none accepted (no agent can be dialled).
"""

from __future__ import annotations

import time

import trio

from keytrio.scenarios.push_support import PUSH, QUOTE_INTERVAL, passed, push_testbed, stored_notices
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import FAILED, GET_QUOTE

TIMEOUT = "internal.verifier.attestation_timeout"
MAX_INTERVAL = 5 * QUOTE_INTERVAL
EXPECT = {"m0": Expect(events=(TIMEOUT,), notices=(), states=(GET_QUOTE, FAILED), final=FAILED)}


@scenario("push-silent", expect=EXPECT)
async def push_silent(run: Run) -> None:
    async with push_testbed(run) as tb:
        (m,) = await tb.add_machines(1, **PUSH)
        async with run.step("enrol (push), attest"):
            await tb.enrol_push(m)
            await passed(tb, m)
            await tb.wait_count(m, 2)

        async with run.step("cut the machine's uplink: still Get Quote one interval later"):
            assert m.nat is not None
            m.cut_network("refuse")
            cut = time.monotonic()
            await trio.sleep(QUOTE_INTERVAL)
            rec = await tb.get(m)
            run.check(rec is not None and rec["operational_state"] == GET_QUOTE,
                      f"state {rec and rec['operational_state']} {QUOTE_INTERVAL} s after the cut")

        async with run.step(f"after maximum_attestation_interval ({MAX_INTERVAL:g} s): Failed, timeout"):
            rec = await tb.wait_state(m, FAILED, timeout=MAX_INTERVAL + 10)
            after = time.monotonic() - cut
            run.check(rec["last_event_id"] == TIMEOUT, f"event {rec['last_event_id']}")
            run.note(f"Failed {after:.1f} s after the cut: {rec['last_event_id']}")

        async with run.step("the revocation notice is stored"):
            with trio.fail_after(5):
                while not (found := await stored_notices(tb, m)):
                    await trio.sleep(0.05)
            run.check(found == [TIMEOUT], f"notices {found}")
