"""Agent unreachable: its network is cut (refused, then blackholed); the verifier fails it, and
after the network is restored a tenant reactivate brings it back.

Story: one machine is enrolled and attested. Its network is cut in "refuse" mode (connections
reset): the verifier retries (Get Quote (retry)) max_retries times, then marks it Failed with
``internal.verifier.not_reachable`` and queues a revocation notice for every agent (it cannot reach the cut machine
yet). The network comes back, the tenant reactivates the agent, attestation resumes, and the
verifier's notice outbox, still retrying with backoff, delivers the notice to the machine. Then the same with a
"blackhole" (connections accepted, never answered): each request times out
(request_timeout 1 s) and the verifier again ends in Failed ``internal.verifier.not_reachable``; restore + reactivate.
Expected verdict: Get Quote -> Get Quote (retry) -> Failed (not_reachable) -> Get Quote -> Get Quote
(retry) -> Failed (not_reachable) -> Get Quote; the machine received both not_reachable notices (late,
once its network was back).
"""

from __future__ import annotations

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import FAILED, GET_QUOTE

RETRY = 4
EXPECT = {"m0": Expect(
    events=("internal.verifier.not_reachable", "internal.verifier.not_reachable"),
    notices=(("m0", "internal.verifier.not_reachable"), ("m0", "internal.verifier.not_reachable")),
    states=(GET_QUOTE, RETRY, FAILED, GET_QUOTE, RETRY, FAILED, GET_QUOTE),
    final=GET_QUOTE,
)}


@scenario("agent-unreachable", expect=EXPECT)
async def agent_unreachable(run: Run) -> None:
    async with run.testbed(machines=1, request_timeout=1.0) as tb:
        m = tb.machines[0]
        async with run.step("enrol and attest"):
            await tb.enrol(m)
            await tb.wait_count(m, 2)

        for want, mode in enumerate(("refuse", "blackhole"), start=1):
            async with run.step(f"cut the network ({mode}): retries, then Failed"):
                m.cut_network(mode)  # type: ignore[arg-type]
                await tb.wait_state(m, RETRY, timeout=10)
                rec = await tb.wait_state(m, FAILED, timeout=20)
                run.note(f"event {rec['last_event_id']}")

            async with run.step("restore the network and reactivate: Get Quote again, the queued notice arrives"):
                m.restore_network()
                count = rec["attestation_count"]
                await tb.tenant.reactivate(m.agent_id)  # type: ignore[union-attr]
                rec = await tb.wait_count(m, count + 2)
                run.note(f"attestation_count {count} -> {rec['attestation_count']}")
                # the verifier's outbox keeps retrying the notice (backoff) until the machine is back
                notices = await tb.wait_notices(m, want)
                run.check(all(n["event_id"] == "internal.verifier.not_reachable" for n in notices), f"notices {notices}")
                run.note(f"{len(notices)} not_reachable notice(s) received")
