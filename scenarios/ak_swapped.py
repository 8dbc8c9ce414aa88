"""AK swapped: a machine is enrolled at the verifier with another machine's AK.

Story: two machines register. Someone enrols m0 with the verifier directly (a POST with every
field upstream's tenant sends) but gives m1's AK as ``ak_tpm`` - as if the registrar record had
been swapped. The verifier polls m0, whose quotes are signed by m0's own AK: the signature does
not verify with the enrolled AK. (The tenant library would have refused earlier: it checks the
identity quote with the registrar's AK; this scenario is about the verifier's own check.)
Expected verdict: m0 Invalid Quote with ``qoute_validation.quote_validation`` (sic, upstream's
id) and a signed notice about m0 on m0; V is never delivered; m1 is never polled.
"""

from __future__ import annotations

import base64
import json
import os

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.observe import GONE
from keytrio.testbed.world import INVALID_QUOTE

EVENT = "qoute_validation.quote_validation"
EXPECT = {
    "m0": Expect(events=(EVENT,), notices=(("m0", EVENT),), final=INVALID_QUOTE),
    "m1": Expect(events=(), notices=(), final=GONE),
}


@scenario("ak-swapped", expect=EXPECT)
async def ak_swapped(run: Run) -> None:
    async with run.testbed(machines=2) as tb:
        m0, m1 = tb.machines
        ca = tb.ca
        assert ca is not None and m0.info is not None and m1.info is not None
        admin = make_client(tls.client_context([ca.ca], ca.client_cert, ca.client_key), timeout=10)
        async with admin:
            async with run.step("POST m0's enrolment to the verifier with m1's AK"):
                body = {
                    "v": base64.b64encode(os.urandom(32)).decode(),
                    "cloudagent_ip": m0.contact[0], "cloudagent_port": m0.contact[1],
                    "tpm_policy": json.dumps({"mask": "0x0"}),
                    "runtime_policy": "", "runtime_policy_name": None, "runtime_policy_key": "",
                    "mb_policy": None, "mb_policy_name": None, "ima_sign_verification_keys": "",
                    "metadata": "{}", "revocation_key": ca.revocation_key.read_text(),
                    "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
                    "accept_tpm_encryption_algs": ["ecc", "rsa"],
                    "accept_tpm_signing_algs": ["ecschnorr", "rsassa"],
                    "ak_tpm": base64.b64encode(m1.info.ak_public).decode(),
                    "mtls_cert": m0.info.mtls_cert, "supported_version": "2.1",
                }
                resp = await admin.post(f"{tb.verifier_url}/v2.1/agents/{m0.agent_id}", json=body)
                run.check(resp.status_code == 200, f"enrolment answered {resp.status_code}: {resp.text}")

            async with run.step("the verifier rejects m0's first quote: signature does not verify"):
                rec = await tb.wait_state(m0, INVALID_QUOTE)
                run.check(rec["attestation_count"] == 0, f"{rec['attestation_count']} attestations counted")
                run.note(f"event {rec['last_event_id']}")
                await tb.wait_notices(m0, 1)
                run.check(await tb.get(m1) is None, "m1 known to the verifier")
