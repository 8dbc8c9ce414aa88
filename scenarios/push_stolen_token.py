"""Push agent, stolen session token: machine B's bearer token is refused on machine A's routes.

Story: two push machines behind NATs (A = m0, B = m1) are enrolled and attest. An attacker holding
B's valid PoP token (taken from B's running agent) calls the verifier's push API as a push agent
does (server-verified TLS, no client certificate) for A: it opens an attestation for A (POST
capabilities), submits evidence for A's latest attestation (PATCH) and reads A's history (GET).
Then a forged token (the right shape, an unknown secret) and a malformed one.
Expected verdict: 403 for B's token on each of A's routes (the token is good, the agent is not
its own), 401 for the forged and the malformed token; no failed attestation in A's history, A and
B keep passing (Get Quote throughout, no event).
"""

from __future__ import annotations

import uuid

from keytrio.actors.agent import push_messages as msg
from keytrio.scenarios.push_support import PUSH, attester, bearer, passed, push_testbed, token_of, v3_client
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.world import GET_QUOTE

EXPECT = {name: Expect(events=(), notices=(), states=(GET_QUOTE,), final=GET_QUOTE) for name in ("m0", "m1")}
NO_EVIDENCE = {"data": {"type": "attestation", "attributes": {"evidence_collected": []}}}


@scenario("push-stolen-token", expect=EXPECT)
async def push_stolen_token(run: Run) -> None:
    async with push_testbed(run) as tb:
        a, b = await tb.add_machines(2, **PUSH)
        async with run.step("enrol A and B (push); both pass"):
            await tb.enrol_push(a)
            await tb.enrol_push(b)
            await passed(tb, a)
            await passed(tb, b)
            stolen = await token_of(b)
            caps = msg.capabilities_request(await attester(a).evidence.capabilities())

        base = f"{tb.verifier_url}/v3/agents/{a.agent_id}/attestations"
        async with v3_client(tb) as http:
            async with run.step("B's token on A's attestations: POST, PATCH and GET refused with 403"):
                before = {x["index"] for x in await tb.push_attestations(a)}
                calls = [("POST", base, caps), ("PATCH", f"{base}/latest", NO_EVIDENCE), ("GET", base, None)]
                for method, url, body in calls:
                    r = await http.request(method, url, json=body, headers=bearer(stolen))
                    run.check(r.status_code == 403, f"{method} with B's token: HTTP {r.status_code} {r.text[:200]}")
                    run.note(f"{method} {url.removeprefix(tb.verifier_url)} with B's token: HTTP {r.status_code}")
                after = await tb.push_attestations(a)
                run.check(not [x for x in after if x["evaluation"] == "fail"], f"A's history {after}")
                run.note(f"A's history: {len(after)} attestations, none failed ({len(set(x['index'] for x in after) - before)} new, by A's own agent)")

            async with run.step("a forged and a malformed token: 401"):
                forged = f"{uuid.uuid4()}.{'A' * 43}"
                for label, token in (("forged", forged), ("malformed", "not-a-token")):
                    for method, url, body in [("POST", base, caps), ("GET", base, None)]:
                        r = await http.request(method, url, json=body, headers=bearer(token))
                        run.check(r.status_code == 401, f"{method} with a {label} token: HTTP {r.status_code}")
                run.note("forged and malformed tokens: HTTP 401 on POST and GET")

        async with run.step("A and B unaffected: both keep passing"):
            last_a = max(x["index"] for x in await tb.push_attestations(a))
            last_b = max(x["index"] for x in await tb.push_attestations(b))
            await passed(tb, a, last_a)
            await passed(tb, b, last_b)
            for m in (a, b):
                rec = await tb.get(m)
                run.check(rec is not None and rec["operational_state"] == GET_QUOTE
                          and rec["last_event_id"] in (None, ""), f"{m.name}: {rec}")
