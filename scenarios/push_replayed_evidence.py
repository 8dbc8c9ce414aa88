"""Push agent, replayed and foreign-signed evidence: both refused, nothing accepted.

Story: two push machines behind NATs (m0, m1) are enrolled and attest. An attacker taps m0's wire
(its agent's calls to the verifier) and records one of its evidence submissions: a quote that was
genuine, signed by m0's AK, for that attestation's challenge. m0's agent is stopped and the attacker,
holding m0's token, replays the recorded PATCH: to its own (finished) attestation it is refused
with 403; to a new attestation it opened with m0's capabilities, the old quote does not carry the
new challenge and the evaluation fails with ``broken_evidence_chain``. For m1 (agent stopped too),
the attacker opens an attestation with m1's token and answers its challenge with a quote signed by
m0's TPM (a foreign AK): the evaluation fails with ``broken_evidence_chain`` as well.
Expected verdict: Get Quote, then Invalid Quote for both (m0: the quote's nonce is not the
challenge; m1: the signature is not m1's AK's); no attestation after the tampering passes.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from keytrio.actors.agent import push_messages as msg
from keytrio.actors.agent.push_client import Answer, VerifierClient
from keytrio.scenarios.push_support import PUSH, attester, bearer, passed, push_testbed, token_of, v3_client
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.machine import Machine
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE, Testbed

QUOTE_EVENT = "qoute_validation.quote_validation"
EXPECT = {name: Expect(events=(QUOTE_EVENT,), notices=(), states=(GET_QUOTE, INVALID_QUOTE), final=INVALID_QUOTE)
          for name in ("m0", "m1")}
BROKEN = "broken_evidence_chain"


class Tap(VerifierClient):
    """The agent's own client, recording what it sends: (method, path, body) of every call."""

    def __init__(self, inner: VerifierClient) -> None:
        self.__dict__.update(inner.__dict__)  # same URL, TLS context and pooled connection
        self.sent: list[tuple[str, str, Any]] = []

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Answer:
        answer = await super().call(method, path, body, token=token)
        self.sent.append((method, path, body))
        return answer

    def last(self, method: str, marker: str) -> tuple[str, Any]:
        return next((p, b) for m, p, b in reversed(self.sent) if m == method and marker in p)


async def open_attestation(http: httpx.AsyncClient, tb: Testbed, m: Machine, token: str,
                           caps: Any) -> httpx.Response:
    """POST capabilities for ``m`` as its agent would, waiting out 429 (premature) and 503 (the
    agent's last evidence still being verified) as the verifier's ``Retry-After`` says."""
    url = f"{tb.verifier_url}/v3/agents/{m.agent_id}/attestations"
    with trio.fail_after(10):
        while True:
            r = await http.post(url, json=caps, headers=bearer(token))
            if r.status_code not in (429, 503):
                return r
            await trio.sleep(float(r.headers.get("retry-after", "1")))


async def failed(tb: Testbed, m: Machine, index: int) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            for a in await tb.push_attestations(m):
                if a["index"] == index and a["evaluation"] != "pending":
                    return a
            await trio.sleep(0.05)


@scenario("push-replayed-evidence", expect=EXPECT)
async def push_replayed_evidence(run: Run) -> None:
    async with push_testbed(run) as tb:
        m0, m1 = await tb.add_machines(2, **PUSH)
        async with run.step("enrol both (push); tap m0's wire; both pass"):
            tap = Tap(attester(m0).client)
            attester(m0).client = tap
            await tb.enrol_push(m0)
            await tb.enrol_push(m1)
            await passed(tb, m1)
            await tb.wait_count(m1, 2)
            first = await passed(tb, m0)
            await passed(tb, m0, first["index"])  # one more, sent through the tap
            await tb.wait_count(m0, 2)
            old_path, old_evidence = tap.last("PATCH", "/attestations/")
            _, caps0 = tap.last("POST", "/attestations")
            token0, token1 = await token_of(m0), await token_of(m1)
            caps1 = msg.capabilities_request(await attester(m1).evidence.capabilities())
            run.note(f"recorded m0's evidence for {old_path.rsplit('/', 1)[-1]}")

        async with v3_client(tb) as http:
            async with run.step("m1: a quote signed by m0's TPM (a foreign AK) answers m1's challenge"):
                await m1.stop_agent()
                r = await open_attestation(http, tb, m1, token1, caps1)
                run.check(r.status_code == 201, f"capabilities: HTTP {r.status_code} {r.text[:200]}")
                requested = msg.parse_requested(r.json(), r.headers.get("location"))
                forged = await attester(m0).evidence.collect(requested)  # m0's AK, m1's challenge
                r = await http.patch(f"{tb.verifier_url}/v3/agents/{m1.agent_id}/attestations/latest",
                                     json=msg.evidence_request(requested, forged), headers=bearer(token1))
                run.check(r.status_code in (202, 403), f"foreign evidence: HTTP {r.status_code}")
                foreign_index = int(requested.index or -1)
                bad = await failed(tb, m1, foreign_index)
                run.check(bad["evaluation"] == "fail" and bad["failure_reason"] == BROKEN, f"m1: {bad}")
                rec = await tb.wait_state(m1, INVALID_QUOTE, timeout=10)
                run.note(f"HTTP {r.status_code}; attestation {bad['index']}: {bad['evaluation']}, "
                         f"{bad['failure_reason']}; event {rec['last_event_id']}")

            async with run.step("m0: its recorded evidence replayed, to the old and to a new attestation"):
                await m0.stop_agent()
                r = await http.patch(tb.verifier_url + old_path, json=old_evidence, headers=bearer(token0))
                run.check(r.status_code == 403, f"replay to the old attestation: HTTP {r.status_code} {r.text[:200]}")
                run.note(f"replayed to {old_path.rsplit('/', 1)[-1]}: HTTP {r.status_code}")
                r = await open_attestation(http, tb, m0, token0, caps0)
                run.check(r.status_code == 201, f"capabilities: HTTP {r.status_code} {r.text[:200]}")
                index = int(msg.parse_requested(r.json(), r.headers.get("location")).index or -1)
                r = await http.patch(f"{tb.verifier_url}/v3/agents/{m0.agent_id}/attestations/latest",
                                     json=old_evidence, headers=bearer(token0))
                run.check(r.status_code in (202, 403), f"replayed evidence: HTTP {r.status_code}")
                bad = await failed(tb, m0, index)
                run.check(bad["evaluation"] == "fail" and bad["failure_reason"] == BROKEN, f"m0: {bad}")
                rec = await tb.wait_state(m0, INVALID_QUOTE, timeout=10)
                run.note(f"replayed to {index}: HTTP {r.status_code}; {bad['evaluation']}, {bad['failure_reason']}; "
                         f"event {rec['last_event_id']}")

            async with run.step("nothing accepted: no pass since, and a failed agent gets no new attestation"):
                for m, since, token, caps in ((m0, index, token0, caps0), (m1, foreign_index, token1, caps1)):
                    late = [a for a in await tb.push_attestations(m) if a["index"] >= since and a["evaluation"] == "pass"]
                    run.check(not late, f"{m.name}: passed after the tampering {late}")
                    r = await open_attestation(http, tb, m, token, caps)
                    run.check(r.status_code == 403, f"{m.name}: capabilities after the failure: HTTP {r.status_code}")
                run.note("capabilities from either agent after its failure: HTTP 403")
