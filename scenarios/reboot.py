"""Reboot mid-attestation: the machine reboots while attested; attestation continues.

Story: one machine measures three files and is enrolled with a runtime policy built from its IMA
log (PCR 10 in the mask), and attested. It reboots: the agent stops, TPM2_Shutdown(CLEAR),
the swtpm restarts (PCRs reset, resetCount + 1), the boot log is replayed into PCRs 0-7, a fresh
IMA log starts with boot_aggregate, the boot time changes, and the agent starts again and
re-binds its NK (kept on disk) into PCR 16. The agent is stopped first and the verifier is seen
retrying before the TPM goes down (so the outage is observed, not raced): its polls fail to
connect and are retried (retry_interval 0.5 s, up to 10 retries, so a reboot of a few seconds is bridged).
What keytrio's verifier does: the first quote after the reboot verifies (resetCount went up,
restartCount/clock are judged within the new resetCount), so attestation continues without a
tenant action; the IMA entry pointer beyond the new, shorter log makes the agent send the new
log from line 0, and the verifier replays the new boot's log (boot_aggregate, then the same three
files loaded again) against the new PCR 10. The agent lost K with its restart (U and V were in memory only).
Expected verdict: Get Quote -> Get Quote (retry) -> Get Quote, attestation_count grows past the
reboot, no event, no notice.
"""

from __future__ import annotations

from keytrio.actors.verifier import records
from keytrio.scenarios.ima_support import policy_from_log
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE

RETRY = 4
EXPECT = {"m0": Expect(events=(), notices=(), states=(GET_QUOTE, RETRY, GET_QUOTE), final=GET_QUOTE)}


@scenario("reboot", expect=EXPECT)
async def reboot(run: Run) -> None:
    async with run.testbed(machines=1, retry_interval=0.5, max_retries=10) as tb:
        m = tb.machines[0]
        contents = {f"/usr/bin/tool{i}": m.rng.randbytes(64) for i in range(3)}
        async with run.step("measure a few files; enrol with a runtime policy from the IMA log; attest"):
            for path, data in contents.items():
                await m.measure(path, data)
            await tb.enrol(m, runtime_policy=policy_from_log(m), tpm_policy={"mask": "0x400"})
            rec = await tb.wait_count(m, 3)
            boot_before, count = m.boottime_path.read_text().strip(), rec["attestation_count"]

        async with run.step("shutdown begins: the agent stops, the verifier retries"):
            await m.stop_agent()
            await tb.wait_state(m, RETRY, timeout=10)

        async with run.step("reboot (TPM reset, boot log, fresh IMA log, new boot time, agent start)"):
            await m.reboot()
            boot_after = m.boottime_path.read_text().strip()
            run.note(f"boottime {boot_before} -> {boot_after}")
            for path, data in contents.items():  # the same files load again in the new boot
                await m.measure(path, data)

        async with run.step("the verifier bridges the outage and attests the new boot"):
            after = (await tb.get(m) or {}).get("attestation_count", count)
            rec = await tb.wait_count(m, max(after, count) + 3)  # 3 quotes after the files loaded again
            run.check(rec["last_event_id"] in (None, ""), f"event {rec['last_event_id']}")
            assert tb.verifier is not None and tb.verifier.store is not None
            row = await records.get(tb.verifier.store, m.agent_id)
            run.check(row is not None and str(row["boottime"]) == boot_after,
                      f"verifier's stored boottime {row and row['boottime']}, machine's {boot_after}")
            run.note(f"attestation_count {count} -> {rec['attestation_count']}; the verifier holds the new boottime")
