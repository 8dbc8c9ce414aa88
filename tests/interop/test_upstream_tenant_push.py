"""Issue 19 item 5 (second half): upstream Keylime 7.14.3's ``keylime_tenant -c add --push-model``
enrols OUR push agent on OUR verifier (mode push, and mode both), the agent registered with OUR registrar.

The machine is a testbed machine (real swtpm, a real IMA log that extends PCR 10, our agent with
``mode = "push"``). Upstream's tenant runs from the project's upstream venv with a tenant.conf
pointing at our servers (our_servers.upstream_tenant_env); it asks our verifier for ``/version``,
fetches the AK from our registrar's TLS port and POSTs the push enrolment (ip/port null) to our
verifier (shared/PUSH_MODEL_WIRE.md). The verdicts are read as an admin reads them (mTLS,
``GET /v3/agents/{id}/attestations/latest``): pass, and after a file outside the runtime policy
is measured, fail with ``policy_violation``. Waits are hang guards on real processes.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common import client as http
from tests.interop.our_servers import our_servers, registered_and_policy, upstream_tenant_env
from tests.interop.support import Upstream, agent_record, run_tool, running_machine, server_client

pytestmark = [pytest.mark.interop, pytest.mark.swtpm]


async def wait_latest(client: Any, base: str, agent_id: str, pred: Any, what: str,
                      timeout: float = 60.0) -> dict[str, Any]:
    last: dict[str, Any] = {}
    with trio.move_on_after(timeout):  # hang guard
        while True:
            reply = await client.get(f"{base}/v3/agents/{agent_id}/attestations/latest")
            if reply.status_code == 200:
                last = reply.json()["data"]
                if pred(last):
                    return last
            await trio.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout}s; last: {json.dumps(last)[:2000]}")


def done(data: dict[str, Any]) -> bool:
    return data.get("attributes", {}).get("stage") == "verification_complete"


@pytest.mark.parametrize("mode", ["push", "both"])
async def test_upstream_tenant_enrols_our_push_agent_on_our_verifier(upstream: Upstream, tmp_path: Path,
                                                                     mode: str) -> None:
    agent_id = str(uuidlib.uuid4())
    async with our_servers(tmp_path / "servers", mode=mode) as servers, running_machine(
        "m-push-ours", tmp_path, servers.ca, registrar=servers.registrar.http, uuid=agent_id, mode="push",
        verifier_url=servers.verifier_url, verifier_tls_ca_cert=str(servers.ca.ca),
        backoff_initial_delay=0.5, backoff_max_delay=2.0,
    ) as machine, server_client(servers.ca) as client:
        for i in range(3):
            await machine.measure(f"/usr/bin/good{i}", b"good content %d" % i)
        assert machine.agent is not None and machine.agent.push is not None
        push = machine.agent.push
        await push.wait_for(lambda s: s.failures >= 1)  # not enrolled yet: its sessions are refused
        assert push.stats.sessions == 0, push.stats

        env = upstream_tenant_env(upstream, servers, tmp_path / "tenant-work")
        tenant = upstream.tool("keylime_tenant")
        policy = tmp_path / "policy.json"
        await registered_and_policy(upstream, env, agent_id, machine.ima_path, policy, "/usr/bin/good0")

        add = await run_tool([*tenant, "-c", "add", "--push-model", "-u", agent_id, "--runtime-policy", str(policy)],
                             env, timeout=120)
        # our /version answers 200 (upstream's push verifier: 410, then its tenant falls back to
        # v2.6): upstream's tenant takes our current_version 2.5 for both servers
        for server in ("registrar", "verifier"):
            assert f"Using API version 2.5 for {server} communication" in add.stdout + add.stderr, add.describe()
        # the enrolment as our verifier stored it: no contact, the AK from our registrar, the policy
        record = await agent_record(client, servers.verifier_url, agent_id)
        assert (record.get("ip"), record.get("port")) == (None, None), record
        assert record["has_runtime_policy"] == 1, record

        first = await wait_latest(client, servers.verifier_url, agent_id, done, "a verdict")
        assert first["attributes"]["evaluation"] == "pass", (json.dumps(first)[:2000], add.describe())
        later = await wait_latest(client, servers.verifier_url, agent_id,
                                  lambda d: done(d) and int(d["id"]) >= int(first["id"]) + 2, "two more verdicts")
        assert later["attributes"]["evaluation"] == "pass", json.dumps(later)[:2000]
        assert push.stats.sessions >= 1, push.stats

        # upstream's tenant reads the status of a push agent from our verifier too
        cvstatus = await run_tool([*tenant, "-c", "cvstatus", "-u", agent_id], env)
        assert agent_id in cvstatus.stdout, cvstatus.describe()

        await machine.measure("/usr/bin/not-in-policy", b"evil")
        failed = await wait_latest(client, servers.verifier_url, agent_id,
                                   lambda d: done(d) and d["attributes"]["evaluation"] == "fail", "a failed verdict")
        assert int(failed["id"]) > int(later["id"]), failed
        assert failed["attributes"].get("failure_reason") == "policy_violation", json.dumps(failed)[:2000]

        delete = await run_tool([*tenant, "-c", "delete", "-u", agent_id], env, check=False)
        assert f"Agent {agent_id} deleted from the CV" in delete.stdout, delete.describe()
        gone = await http.request_json(client, "GET", f"{servers.verifier_url}/v2.1/agents/{agent_id}", expect=None)
        assert gone.status_code == 404, gone
