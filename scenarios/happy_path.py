"""Happy path: an agent is enrolled with a payload whose autorun.sh runs, and stays trusted.

Story: one machine boots (PCRs 0-7 from its boot log, IMA boot_aggregate), its agent registers
and activates its AK with the registrar. The tenant enrols it with the verifier: identity quote
checked, U + an encrypted payload (a config file and an autorun.sh) to the agent, V via the
verifier after the first good quote; the agent proves K (keys/verify). The payload's autorun.sh
runs on the machine, and the verifier keeps attesting it every quote_interval.
Expected verdict: Get Quote throughout, attestation_count keeps growing, no event, no notice;
the autorun marker file exists with the payload's config file beside it.
"""

from __future__ import annotations

from keytrio.actors.tenant import make_payload
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE

EXPECT = {"m0": Expect(events=(), notices=(), states=(GET_QUOTE,), final=GET_QUOTE)}


@scenario("happy-path", expect=EXPECT)
async def happy_path(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        marker = m.dir / "autorun-ran"
        src = run.dir / "payload"
        (src / "conf").mkdir(parents=True, exist_ok=True)
        (src / "conf" / "app.conf").write_text(f"seed={run.seed}\n")
        autorun = f'cat conf/app.conf > "{marker}"\necho autorun >> "{marker}"\n'

        async with run.step("tenant add with a payload (conf/app.conf + autorun.sh)"):
            res = await tb.enrol(m, payload=make_payload(src, autorun=autorun))
            run.check(res.verified, "the agent did not prove K")
            run.note(f"agent {m.agent_id}: {res.operational_state_name}, K proven by keys/verify")

        async with run.step("the payload's autorun.sh ran on the machine"):
            await tb.wait(m, lambda r: marker.is_file() and "autorun" in marker.read_text(),
                          "autorun marker written", timeout=10)
            run.check(marker.read_text() == f"seed={run.seed}\nautorun\n", f"marker {marker.read_text()!r}")

        async with run.step("the verifier keeps attesting: 5 more good quotes, no event"):
            first = (await tb.get(m) or {})["attestation_count"]
            rec = await tb.wait_count(m, first + 5)
            run.check(rec["last_event_id"] in (None, ""), f"event {rec['last_event_id']}")
            run.note(f"attestation_count {first} -> {rec['attestation_count']}")
