"""A replayed registration changes nothing visible (issue 16 item 5), end to end on the Testbed:
a real registrar (plain HTTP + mTLS), a real verifier and agents on swtpm, the tenant.

Anyone who reaches the registrar's plain port can POST an agent's public EK/AK/EK cert again. Until
that registration is activated (which needs the agent's TPM), GET keeps answering with the active
record, the tenant's add/status work and the verifier keeps attesting; a wrong activation discards
the replay; the agent's own re-registration (a restart) takes effect once it activates.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest

from keytrio.testbed.machine import Machine
from keytrio.testbed.world import GET_QUOTE, Testbed

pytestmark = pytest.mark.swtpm


def public_body(m: Machine, **changes: Any) -> dict[str, Any]:
    """What the agent of ``m`` sent to the registrar, all of it public (as a sniffer would see it)."""
    info = m.info
    assert info is not None
    body = {
        "ek_tpm": base64.b64encode(info.ek_public).decode(),
        "ekcert": base64.b64encode(info.ek_cert_der).decode() if info.ek_cert_der else None,
        "aik_tpm": base64.b64encode(info.ak_public).decode(),
        "mtls_cert": info.mtls_cert,
        "ip": info.address[0],
        "port": info.address[1],
    }
    return {**body, **changes}


async def registrar_record(tb: Testbed, m: Machine) -> dict[str, Any] | None:
    """The registrar's record of ``m`` as the tenant sees it (mTLS GET; None on 404)."""
    assert tb.tenant is not None
    return (await tb.tenant.status(m.agent_id))["registrar"]


async def test_replayed_registration_changes_nothing_visible(tmp_path: Path) -> None:
    async with Testbed(tmp_path, machines=2, seed=16) as tb:
        a, b = tb.machines
        await tb.enrol(a)
        first = await registrar_record(tb, a)
        assert first is not None and first["regcount"] == 1
        count = (await tb.wait_count(a, 2))["attestation_count"]

        async with httpx.AsyncClient(base_url=tb.registrar_http_url, timeout=10) as plain:
            url = f"/v2.1/agents/{a.agent_id}"
            # the same public keys, with the agent's own contact data or someone else's
            for body in (public_body(a), public_body(a, ip="192.0.2.1", port=1, mtls_cert=None)):
                r = await plain.post(url, json=body)
                assert r.status_code == 200 and r.json()["results"]["blob"]
                assert await registrar_record(tb, a) == first
            # another TPM's keys under a's id: refused, nothing changes
            r = await plain.post(url, json=public_body(b))
            assert r.status_code == 403, r.text
            assert await registrar_record(tb, a) == first

            # meanwhile: the verifier attests a, and the tenant enrols b (after a replay of b too)
            rec = await tb.wait_count(a, count + 3)
            assert rec is not None and rec["operational_state"] == GET_QUOTE
            r = await plain.post(f"/v2.1/agents/{b.agent_id}", json=public_body(b, port=2))
            assert r.status_code == 200
            res = await tb.enrol(b)
            assert res.verified and res.operational_state == GET_QUOTE

            # an activation without the TPM's answer: the replay is discarded, a stays as it was
            r = await plain.put(f"{url}/activate", json={"auth_tag": "00" * 48})
            assert r.status_code == 400 and "discarded" in r.json()["status"]
            assert await registrar_record(tb, a) == first

        # the agent's own re-registration (a restart) is activated with its TPM: now visible
        await a.stop_agent()
        await a.start_agent()
        again = await registrar_record(tb, a)
        assert again is not None and again["regcount"] == 2
        assert {k: v for k, v in again.items() if k != "regcount"} == {
            k: v for k, v in first.items() if k != "regcount"}
        now = await tb.get(a)
        assert now is not None
        rec = await tb.wait_count(a, now["attestation_count"] + 2)
        assert rec is not None and rec["operational_state"] == GET_QUOTE
