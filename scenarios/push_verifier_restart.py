"""Push agents and a verifier restart: the verifier stops mid-session and starts again; the push
agents resume by themselves.

Story: three push machines behind NAT gateways are enrolled and pass. The verifier is stopped
(its push deadlines end, the SQLite file is closed): each agent's next push fails and it backs off.
It starts again on the same port with the same database, re-arms each agent's deadline from the
stored attestations, and the agents, retrying, get through on their own: nobody reactivates them.
Expected verdict: every machine passes new attestations after the restart and its
attestation_count grows past its value before; Get Quote throughout, no event, no notice.
"""

from __future__ import annotations

import trio

from keytrio.scenarios.push_support import PUSH, QUOTE_INTERVAL, last_index, passed, push_testbed
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE

SIZE = 3
EXPECT = {f"m{i}": Expect(events=(), notices=(), states=(GET_QUOTE,), final=GET_QUOTE) for i in range(SIZE)}


@scenario("push-verifier-restart", expect=EXPECT)
async def push_verifier_restart(run: Run) -> None:
    async with push_testbed(run) as tb:
        async with run.step(f"enrol {SIZE} push machines behind NAT, each passes twice"):
            await tb.add_machines(SIZE, **PUSH)
            for m in tb.machines:
                await tb.enrol_push(m)
            for m in tb.machines:
                await tb.wait_count(m, 2)

        async with run.step("stop the verifier; every agent's next push fails; start it again (same port, database)"):
            before = {m.name: (await tb.get(m) or {})["attestation_count"] for m in tb.machines}
            last = {m.name: await last_index(tb, m) for m in tb.machines}
            dialled = {m.name: m.nat.outbound_connections for m in tb.machines if m.nat is not None}
            await tb.stop_verifier()
            # mid-session: each agent dials the stopped verifier (through its NAT) and is turned away
            with trio.fail_after(5 * QUOTE_INTERVAL):
                while any(m.nat is not None and m.nat.outbound_connections <= dialled[m.name] for m in tb.machines):
                    await trio.sleep(0.05)
            await tb.start_verifier()
            run.note(f"counts before: {before}; every agent dialled the stopped verifier")

        async with run.step("every push agent attests again by itself"):
            for m in tb.machines:
                a = await passed(tb, m, last[m.name])
                rec = await tb.wait_count(m, before[m.name] + 2)
                run.note(f"{m.name}: attestation {a['index']} passed; count {before[m.name]} -> "
                         f"{rec['attestation_count']}")
