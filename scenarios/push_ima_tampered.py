"""Push agent, tampered IMA: a file is measured with another digest; the next attestation fails.

Story: a push machine behind a NAT is enrolled with a runtime policy built from its own IMA log
(PCR 10 in the mask) and passes. Then ``/usr/bin/tool1`` is measured again with other contents.
The agent's next pushed evidence carries the new IMA lines; the verifier fails it within one
quote interval (at most the one attestation already in flight passes).
Expected verdict: Get Quote, then Invalid Quote with ``ima.validation.ima-ng.runtime_policy_hash``;
the failed attestation's ``failure_reason`` is ``policy_violation``; the verifier stored the
revocation notice (no pull agent to deliver it to).
"""

from __future__ import annotations

import trio

from keytrio.scenarios.ima_support import FILES, WRONG_DIGEST, policy_from_log
from keytrio.scenarios.push_support import PUSH, last_index, passed, push_testbed, stored_notices
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE

EXPECT = {"m0": Expect(events=(WRONG_DIGEST,), notices=(), states=(GET_QUOTE, INVALID_QUOTE),
                       final=INVALID_QUOTE)}


@scenario("push-ima-tampered", expect=EXPECT)
async def push_ima_tampered(run: Run) -> None:
    async with push_testbed(run) as tb:
        (m,) = await tb.add_machines(1, **PUSH)
        async with run.step("measure files, enrol (push) with a runtime policy built from the IMA log"):
            for path in FILES:
                await m.measure(path)
            await tb.enrol_push(m, runtime_policy=policy_from_log(m), tpm_policy={"mask": "0x400"})
            await passed(tb, m)
            rec = await tb.wait_count(m, 2)
            run.check(rec["has_runtime_policy"] == 1, "the verifier holds no runtime policy")

        async with run.step("measure /usr/bin/tool1 with other contents: the next attestation fails"):
            before = await last_index(tb, m)
            await m.measure("/usr/bin/tool1", b"a trojaned build of tool1\n")
            rec = await tb.wait_state(m, INVALID_QUOTE, timeout=10)
            run.note(f"event {rec['last_event_id']}")
            history = await tb.push_attestations(m)
            failed = [a for a in history if a["evaluation"] == "fail"]
            run.check(len(failed) == 1, f"failed attestations {failed}")
            bad = failed[0]
            run.check(bad["failure_reason"] == "policy_violation", f"failure_reason {bad['failure_reason']}")
            # within one interval: at most the attestation in flight at the measurement came before it
            run.check(bad["index"] <= before + 2, f"failed at index {bad['index']}, last before {before}")
            run.note(f"attestation {bad['index']} failed (last before the change: {before}): policy_violation")

        async with run.step("the revocation notice is stored"):
            with trio.fail_after(5):
                while not (found := await stored_notices(tb, m)):
                    await trio.sleep(0.05)
            run.check(found == [WRONG_DIGEST], f"notices {found}")
