"""Verifier restart: the verifier process stops and starts again; it resumes every agent.

Story: three machines are enrolled and attested. The verifier is stopped (its monitors end, the
SQLite file is closed) and started again on the same port with the same database. On start it
resumes monitoring every stored agent in an active state, continuing the clock checks from the
stored quote data.
Expected verdict: every machine is in Get Quote again and its attestation_count grows past its
value before the restart; no event, no notice.
"""

from __future__ import annotations

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE

EXPECT = {f"m{i}": Expect(events=(), notices=(), states=(GET_QUOTE,), final=GET_QUOTE) for i in range(3)}


@scenario("verifier-restart", expect=EXPECT)
async def verifier_restart(run: Run) -> None:
    async with run.testbed(machines=3) as tb:
        async with run.step("enrol three machines and attest each twice"):
            for m in tb.machines:
                await tb.enrol(m)
            for m in tb.machines:
                await tb.wait_count(m, 2)

        async with run.step("stop the verifier, start it again (same port, same database)"):
            before = {m.name: (await tb.get(m) or {})["attestation_count"] for m in tb.machines}
            await tb.restart_verifier()
            run.note(f"counts before: {before}")

        async with run.step("every agent is attested again"):
            for m in tb.machines:
                rec = await tb.wait_count(m, before[m.name] + 3)
                run.note(f"{m.name}: attestation_count {before[m.name]} -> {rec['attestation_count']}")
