"""Shared by the IMA scenarios: a runtime policy built from a machine's own IMA log, and the
enrolment step (measure files, enrol with the inline policy, PCR 10 in the mask, three good quotes).
"""

from __future__ import annotations

import json

from keytrio.protocol import ima
from keytrio.protocol.runtime_policy import policy_document
from keytrio.scenarios.runner import Expect, Run
from keytrio.testbed.machine import Machine
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE, Testbed

NOT_IN_ALLOWLIST = "ima.validation.ima-ng.not_in_allowlist"
WRONG_DIGEST = "ima.validation.ima-ng.runtime_policy_hash"
FILES = ("/usr/bin/tool0", "/usr/bin/tool1", "/usr/lib/libx.so")


def policy_from_log(m: Machine) -> bytes:
    """A runtime policy (meta.version 1) allowing exactly what ``m`` measured so far."""
    digests: dict[str, list[str]] = {}
    for entry in ima.parse_list(m.ima_path.read_text()):
        digests.setdefault(entry.path, []).append(entry.digest.hex())
    # generator 3, as keylime-policy writes (upstream reports has_runtime_policy only above 1)
    doc = policy_document(meta={"version": 1, "generator": 3}, digests=digests, excludes=["^/tmp/"])
    return json.dumps(doc, sort_keys=True).encode()


async def enrolled(run: Run, tb: Testbed, m: Machine) -> int:
    async with run.step("measure files, enrol with a runtime policy built from the IMA log"):
        for path in FILES:
            await m.measure(path)
        await tb.enrol(m, runtime_policy=policy_from_log(m), tpm_policy={"mask": "0x400"})
        rec = await tb.wait_count(m, 3)
        run.check(rec["has_runtime_policy"] == 1, "the verifier holds no runtime policy")
        run.note(f"{len(FILES)} files + boot_aggregate allowed; three good quotes")
        return int(rec["attestation_count"])


def failing(event: str) -> dict[str, Expect]:
    return {"m0": Expect(events=(event,), notices=(("m0", event),), states=(GET_QUOTE, INVALID_QUOTE),
                         final=INVALID_QUOTE)}


