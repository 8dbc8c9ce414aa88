"""Push happy path behind NAT: a push agent behind a NAT gateway attests on its own and passes;
nothing can connect in.

Story: one machine sits behind a NAT gateway (outbound connections only) and runs a push agent
(API v3.0): it registers through the gateway, listening on no port. The tenant enrols it with the
verifier (mode ``both``) without a contact address. The agent opens a PoP session, sends its
capabilities, receives a challenge and pushes its evidence, again every quote_interval as the
verifier tells it. A connection to the machine's public address is refused.
Expected verdict: Get Quote throughout, passed attestations in the verifier's history, no event, no
notice; every connection went out through the gateway, the inbound one was refused.
"""

from __future__ import annotations

from keytrio.scenarios.push_support import PUSH, dial_in_refused, passed, push_testbed
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE

EXPECT = {"m0": Expect(events=(), notices=(), states=(GET_QUOTE,), final=GET_QUOTE)}


@scenario("push-happy-path", expect=EXPECT)
async def push_happy_path(run: Run) -> None:
    async with push_testbed(run) as tb:
        async with run.step("a push machine behind a NAT registers through the gateway"):
            (m,) = await tb.add_machines(1, **PUSH)
            record = await tb.registrar.service.get(m.agent_id)
            run.check((record["ip"], record["port"]) == (None, None), f"contact {record['ip']}:{record['port']}")
            run.check(m.agent is not None and m.agent.app is None, "the push agent listens on a port")

        async with run.step("tenant add --push: the agent attests by itself and passes"):
            await tb.enrol_push(m)
            first = await passed(tb, m)
            rec = await tb.wait_count(m, 3)
            run.note(f"attestation {first['index']} passed; attestation_count {rec['attestation_count']}")

        async with run.step("nothing connects in: the machine's public address refuses"):
            assert m.nat is not None
            run.check(await dial_in_refused(m.contact), "a connection to the machine was answered")
            run.check(m.nat.inbound_refused >= 1, "the gateway saw no inbound connection")
            run.check(m.nat.outbound_connections >= 2, f"outbound {m.nat.outbound_connections}")
            run.note(f"outbound connections {m.nat.outbound_connections}, inbound refused {m.nat.inbound_refused}")

        async with run.step("it keeps attesting: 3 more, no event"):
            count = rec["attestation_count"]
            rec = await tb.wait_count(m, count + 3)
            run.check(rec["last_event_id"] in (None, ""), f"event {rec['last_event_id']}")
