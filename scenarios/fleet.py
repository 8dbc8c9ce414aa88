"""A fleet of 20 machines, one tampered: only it fails.

Story: twenty machines (twenty swtpms, provisioned and booted concurrently) register and are
enrolled with a tpm_policy pinning PCR 15. Machine m7's PCR 15 changes. The verifier, polling all
twenty, marks only m7 Invalid Quote; every machine (m7 included) runs its revocation actions for
the notice about m7; the nineteen others keep being attested.
Expected verdict: m7 Get Quote -> Invalid Quote (``pcr_validation.invalid_pcr_15``); the others
Get Quote with no event; each of the twenty received exactly the one notice about m7.
"""

from __future__ import annotations

import time

import trio

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.machine import Machine
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE, Testbed

SIZE, VICTIM = 20, "m7"
EVENT = "pcr_validation.invalid_pcr_15"
NOTICE = ((VICTIM, EVENT),)
EXPECT = {f"m{i}": Expect(events=(), notices=NOTICE, final=GET_QUOTE) for i in range(SIZE)}
EXPECT[VICTIM] = Expect(events=(EVENT,), notices=NOTICE, states=(GET_QUOTE, INVALID_QUOTE), final=INVALID_QUOTE)


@scenario("fleet", expect=EXPECT)
async def fleet(run: Run) -> None:
    started = time.perf_counter()
    async with run.testbed(machines=SIZE, quote_interval=0.5) as tb:
        async with run.step(f"{SIZE} machines up (provisioned and booted concurrently), registered"):
            run.note(f"testbed up in {time.perf_counter() - started:.1f} s")
        await _fleet(run, tb)


async def _fleet(run: Run, tb: Testbed) -> None:
    victim = tb.machine(VICTIM)
    async with run.step(f"enrol all {SIZE} with PCR 15 pinned (tenant adds, 5 at a time)"):
        value = (await victim.read_pcrs("sha256", [15]))[15].hex()
        limiter = trio.CapacityLimiter(5)

        async def enrol(m: Machine) -> None:
            async with limiter:
                await tb.enrol(m, tpm_policy={"15": [value]})
        async with trio.open_nursery() as nursery:
            for m in tb.machines:
                nursery.start_soon(enrol, m)
        for m in tb.machines:
            await tb.wait_count(m, 1)

    async with run.step(f"PCR 15 changes on {VICTIM}: only it fails"):
        await victim.extend_data(15, b"tampered")
        rec = await tb.wait_state(victim, INVALID_QUOTE)
        run.note(f"{VICTIM}: {rec['last_event_id']}")

    async with run.step("all twenty ran their actions for the notice; the others are still attested"):
        for m in tb.machines:
            await tb.wait_notices(m, 1)
        others = [m for m in tb.machines if m is not victim]
        counts = {m.name: (await tb.get(m) or {})["attestation_count"] for m in others}
        for m in others:
            await tb.wait_count(m, counts[m.name] + 1)
        run.note(f"{SIZE - 1} machines in Get Quote, one notice each everywhere")
