"""Registrar refusals: a wrong activation auth tag, and an identity change of a registered agent.

Story (plain HTTP calls to the registrar's agent port, as an impostor would make them): a new
agent id is registered with a real machine's EK and AK; the registrar answers a MakeCredential
blob. Activation with an auth tag that is not HMAC(credential, id) is refused (400) and the
pending registration is removed (the mTLS GET answers 404). Then the registered machine m0's id is
registered again with m1's EK and AK: refused (403), and m0's record (regcount, AK) is unchanged.
Expected verdict: both refusals, no change at the registrar; nothing reaches the verifier (no
state, no event).
"""

from __future__ import annotations

import uuid

import httpx

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.scenarios.runner import Expect, Run, scenario

EXPECT: dict[str, Expect] = {}


def _register_body(record: dict, port: int) -> dict:
    return {"ek_tpm": record["ek_tpm"], "aik_tpm": record["aik_tpm"], "ekcert": record.get("ekcert"),
            "mtls_cert": record["mtls_cert"], "ip": "127.0.0.1", "port": port}


@scenario("registrar-refusals", expect=EXPECT)
async def registrar_refusals(run: Run) -> None:
    async with run.testbed(machines=2) as tb:
        m0, m1 = tb.machines
        assert tb.ca is not None
        admin = make_client(tls.client_context([tb.ca.ca], tb.ca.client_cert, tb.ca.client_key), timeout=10)
        plain = httpx.AsyncClient(timeout=10)
        async with admin, plain:
            async def record(agent_id: str) -> httpx.Response:
                return await admin.get(f"{tb.registrar_url}/v2.1/agents/{agent_id}")

            r0 = (await record(m0.agent_id)).json()["results"]
            r1 = (await record(m1.agent_id)).json()["results"]

            async with run.step("register a new id with m0's EK + AK: a credential blob comes back"):
                impostor = str(uuid.UUID(int=run.seed, version=4))
                resp = await plain.post(f"{tb.registrar_http_url}/v2.1/agents/{impostor}",
                                        json=_register_body(r0, 1))
                run.check(resp.status_code == 200, f"registration answered {resp.status_code}: {resp.text}")
                run.check(bool(resp.json()["results"].get("blob")), "no blob")

            async with run.step("activate with a wrong auth tag: 400, the pending registration is gone"):
                resp = await plain.put(f"{tb.registrar_http_url}/v2.1/agents/{impostor}/activate",
                                       json={"auth_tag": "00" * 48})
                run.check(resp.status_code == 400, f"wrong tag answered {resp.status_code}")
                run.note(f"400 {resp.json()['status']}")
                run.check("00" * 48 not in resp.text, "the answer echoes a tag")
                gone = await record(impostor)
                run.check(gone.status_code == 404, f"GET after the refused activation: {gone.status_code}")

            async with run.step("re-register m0's id with m1's EK + AK: 403, m0's record unchanged"):
                resp = await plain.post(f"{tb.registrar_http_url}/v2.1/agents/{m0.agent_id}",
                                        json=_register_body(r1, m0.contact[1]))
                run.check(resp.status_code == 403, f"identity change answered {resp.status_code}")
                run.note(f"403 {resp.json()['status']}")
                after = (await record(m0.agent_id)).json()["results"]
                run.check(after["aik_tpm"] == r0["aik_tpm"] and after["ek_tpm"] == r0["ek_tpm"], "identity changed")
                run.check(after["regcount"] == r0["regcount"], f"regcount {r0['regcount']} -> {after['regcount']}")

            async with run.step("the verifier never heard of either machine"):
                for m in (m0, m1):
                    run.check(await tb.get(m) is None, f"{m.name} known to the verifier")
