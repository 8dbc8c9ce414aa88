"""Foreign CA: a client whose certificate comes from another CA is refused everywhere.

Story: a second CA (same file layout, same subject names) issues a client certificate. With it,
a client asks the verifier for its agent list, the registrar for its agent list and the agent for
its node key. All three refuse at the TLS handshake: the agent requires a client cert from the
server-components CA, and the verifier and registrar (CERT_OPTIONAL) still verify a certificate
that is presented. Without any client cert, verifier and registrar answer the public /version but
give a JSON 403 on the agent list. The same requests with the testbed's own client cert succeed,
so the refusal is about the certificate and nothing else.
Expected verdict: three refusals (handshake); 403 + /version 200 without a cert; 200 x 3 with the
right cert; the enrolled machine stays in Get Quote (no event).
"""

from __future__ import annotations

import httpx

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.pki import make_cv_ca
from keytrio.testbed.world import GET_QUOTE

EXPECT = {"m0": Expect(events=(), notices=(), final=GET_QUOTE)}


@scenario("foreign-ca", expect=EXPECT)
async def foreign_ca(run: Run) -> None:
    async with run.testbed(machines=1) as tb:
        m = tb.machines[0]
        ca = tb.ca
        assert ca is not None and m.info is not None
        other = make_cv_ca(run.dir / "foreign-ca")
        await tb.enrol(m)
        agent_url = "https://{}:{}/v2.1/keys/pubkey".format(*m.contact)
        targets = [("verifier", f"{tb.verifier_url}/v2.1/agents/"),
                   ("registrar", f"{tb.registrar_url}/v2.1/agents/"),
                   ("agent", agent_url)]

        def client(cert_ca: object) -> httpx.AsyncClient:
            c = other if cert_ca == "foreign" else ca
            # the server side is trusted normally (our CA + the agent's pinned cert)
            ctx = tls.client_context([ca.ca], c.client_cert, c.client_key,
                                     pinned_server_cert_pem=m.info.mtls_cert)
            return make_client(ctx, timeout=5)

        async with run.step("foreign client cert: refused by verifier, registrar and agent"):
            async with client("foreign") as foreign:
                for name, url in targets:
                    try:
                        resp = await foreign.get(url)
                    except httpx.TransportError as exc:
                        # CERT_OPTIONAL still verifies a cert that is presented: the handshake fails
                        run.note(f"{name}: TLS handshake refused ({type(exc).__name__})")
                        continue
                    run.check(name != "agent", f"agent answered {resp.status_code} to a foreign cert")
                    run.check(resp.status_code == 403, f"{name} answered {resp.status_code}")
                    run.note(f"{name}: 403 {resp.json().get('status')}")

        async with run.step("no client cert at all: verifier and registrar answer /version, 403 elsewhere"):
            ctx = tls.client_context([ca.ca])
            async with make_client(ctx, timeout=5) as anonymous:
                for name, url in targets[:2]:
                    resp = await anonymous.get(url)
                    run.check(resp.status_code == 403 and resp.json().get("code") == 403,
                              f"{name} answered {resp.status_code} without a client cert")
                    version = await anonymous.get(url.split("/v2.1/")[0] + "/version")
                    run.check(version.status_code == 200, f"{name} /version: {version.status_code}")
                    run.note(f"{name}: 403 {resp.json().get('status')}; /version 200")

        async with run.step("the testbed's client cert: 200 from all three"):
            async with client("own") as own:
                for name, url in targets:
                    resp = await own.get(url)
                    run.check(resp.status_code == 200, f"{name} answered {resp.status_code}")

        async with run.step("attestation was never disturbed"):
            await tb.wait_count(m, 2)
