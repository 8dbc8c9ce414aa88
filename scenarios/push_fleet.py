"""A mixed fleet: three pull agents and three push agents behind NATs on one verifier (mode
``both``); one push machine is tampered and only it fails.

Story: machines m0-m2 run pull agents (the verifier polls them), m3-m5 run push agents behind NAT
gateways (they dial in). All six are enrolled with a tpm_policy pinning PCR 15. Machine m4's PCR 15
changes: its next pushed quote fails. The verifier marks only m4 Invalid Quote and sends its notice
to every agent it can dial: the three pull agents run their actions for it; the push agents, which
cannot be dialled, get nothing. Every other machine keeps being attested, each by its own model.
Expected verdict: m4 Get Quote -> Invalid Quote (``pcr_validation.invalid_pcr_15``); the five others
Get Quote with no event; m0-m2 accepted exactly the notice about m4, m3-m5 none.
"""

from __future__ import annotations

from keytrio.scenarios.push_support import PUSH, passed, push_testbed
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE

VICTIM, EVENT = "m4", "pcr_validation.invalid_pcr_15"
PULL, PUSHED = ("m0", "m1", "m2"), ("m3", "m4", "m5")
EXPECT = {name: Expect(events=(), notices=((VICTIM, EVENT),), final=GET_QUOTE) for name in PULL}
EXPECT.update({name: Expect(events=(), notices=(), final=GET_QUOTE) for name in PUSHED})
EXPECT[VICTIM] = Expect(events=(EVENT,), notices=(), states=(GET_QUOTE, INVALID_QUOTE), final=INVALID_QUOTE)


@scenario("push-fleet-mixed", expect=EXPECT)
async def push_fleet_mixed(run: Run) -> None:
    async with push_testbed(run, machines=len(PULL)) as tb:
        async with run.step("three pull machines, three push machines behind NAT gateways"):
            await tb.add_machines(len(PUSHED), **PUSH)
            run.check([m.name for m in tb.machines] == [*PULL, *PUSHED], f"{[m.name for m in tb.machines]}")

        victim = tb.machine(VICTIM)
        async with run.step("enrol all six with PCR 15 pinned (pull: tenant add; push: tenant add --push)"):
            value = (await victim.read_pcrs("sha256", [15]))[15].hex()
            for name in PULL:
                await tb.enrol(tb.machine(name), tpm_policy={"15": [value]})
            for name in PUSHED:
                await tb.enrol_push(tb.machine(name), tpm_policy={"15": [value]})
            for name in PUSHED:
                await passed(tb, tb.machine(name))
            for m in tb.machines:
                await tb.wait_count(m, 2)

        async with run.step(f"PCR 15 changes on {VICTIM}: only it fails"):
            await victim.extend_data(15, b"tampered")
            rec = await tb.wait_state(victim, INVALID_QUOTE)
            run.note(f"{VICTIM}: {rec['last_event_id']}")

        async with run.step("the pull agents ran their actions for the notice; the others are still attested"):
            for name in PULL:
                await tb.wait_notices(tb.machine(name), 1)
            others = [m for m in tb.machines if m is not victim]
            counts = {m.name: (await tb.get(m) or {})["attestation_count"] for m in others}
            for m in others:
                await tb.wait_count(m, counts[m.name] + 1)
            run.note("five machines in Get Quote; one notice on each pull machine, none on push machines")
