"""Verifier behaviours that upstream's tenant relies on (found by the interop tests)."""

import base64
import json
import os
from pathlib import Path

import pytest
import trio

from keytrio.protocol.runtime_policy import policy_document
from tests.actors.verifier_support import enrol, enrol_body, start_test_agent, start_verifier

pytestmark = pytest.mark.swtpm

POLICY = policy_document(meta={"version": 1, "generator": 3}, digests={"/usr/bin/x": ["ab" * 32]})


async def test_port_listing_and_unnamed_inline_policy(nursery: trio.Nursery, tmp_path: Path, pki, swtpm):
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", port=0)
    agent = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, None)
    body = enrol_body(agent, v=os.urandom(32), tpm_policy={"mask": "0x400"})
    # upstream's tenant: an inline policy with runtime_policy_name "" (no name)
    body["runtime_policy"] = base64.b64encode(json.dumps(POLICY).encode()).decode()
    body["runtime_policy_name"] = ""
    await enrol(rv, agent.agent_id, body)

    rec = await rv.get(agent.agent_id)
    assert rec["verifier_port"] == rv.verifier.address[1] != 0  # the bound port, not the configured 0
    # `keylime_tenant -c cvlist` sends ?verifier= with an empty value: no filter
    listed = await rv.call("GET", "/agents/?verifier=")
    assert [agent.agent_id] in listed["results"]["uuids"]

    # a named copy of the same policy can be added and deleted without orphaning the agent's copy
    named = {"runtime_policy": body["runtime_policy"], "runtime_policy_key": "", "tpm_policy": json.dumps({"mask": "0x400"})}
    resp = await rv.admin.post(f"{rv.url}/allowlists/shared", json=named)
    assert resp.status_code in (200, 201), resp.text
    resp = await rv.admin.delete(f"{rv.url}/allowlists/shared")
    assert resp.status_code in (200, 204), resp.text
    rec = await rv.get(agent.agent_id)
    assert rec["last_event_id"] != "ima.policy_missing"
    assert rec["has_runtime_policy"] == 1
    await rv.stop()
    await agent.run.stop()


def test_tenant_puts_pcr10_in_the_mask_with_a_runtime_policy():
    from keytrio.actors.tenant.add import _tpm_policy_text

    assert json.loads(_tpm_policy_text(None))["mask"] == "0x0"
    assert json.loads(_tpm_policy_text(None, ima=True))["mask"] == "0x400"
    assert json.loads(_tpm_policy_text({"mask": "0x1", "15": ["00" * 32]}, ima=True))["mask"] == hex(1 | 1 << 10 | 1 << 15)
