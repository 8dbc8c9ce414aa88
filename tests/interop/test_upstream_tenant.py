"""Direction 2 of issue 9: upstream Keylime 7.14.3's ``keylime_tenant`` against OUR registrar and
verifier (actors.registrar / actors.verifier in this process), with our agent on a swtpm.

Certificates: made by ``keytrio ca init`` (``actors.ca.authority.Authority.init``) in upstream's
``cv_ca`` layout: ``cacert.crt``, ``server-cert.crt``/``server-private.pem`` (our registrar's and
verifier's HTTPS cert), ``client-cert.crt``/``client-private.pem`` (presented by upstream's tenant
and by our verifier to the agent). Upstream's ``tenant.conf`` is written here in the shape up.sh
writes, with ``tls_dir`` = that directory and ``trusted_server_ca = cacert.crt``, ``client_cert =
client-cert.crt``, ``client_key = client-private.pem`` named explicitly (upstream resolves
``trusted_server_ca = default`` to ``$KEYLIME_DIR/cv_ca/cacert.crt`` whatever ``tls_dir`` says).
"""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path

import pytest

from keytrio.actors.common import client as http
from tests.interop.our_servers import our_servers, registered_and_policy, upstream_tenant_env
from tests.interop.support import (
    GET_QUOTE,
    INVALID_QUOTE,
    Upstream,
    agent_record,
    cert_payload_setup,
    run_tool,
    run_tools,
    running_machine,
    server_client,
    wait_file,
    wait_record,
)

pytestmark = [pytest.mark.interop, pytest.mark.swtpm]


async def test_upstream_tenant_against_our_registrar_and_verifier(upstream: Upstream, tmp_path: Path) -> None:
    agent_id = str(uuidlib.uuid4())
    name = "interop-policy"
    async with our_servers(tmp_path / "servers") as servers, running_machine(
        "m-ours", tmp_path, servers.ca, registrar=servers.registrar.http, uuid=agent_id
    ) as machine, server_client(servers.ca) as client:
        for i in range(2):
            await machine.measure(f"/usr/bin/tool{i}", b"tool %d" % i)
        env = upstream_tenant_env(upstream, servers, tmp_path / "tenant-work")
        tenant = upstream.tool("keylime_tenant")

        policy = tmp_path / "policy.json"
        await registered_and_policy(upstream, env, agent_id, machine.ima_path, policy, "/usr/bin/tool0")

        # add: upstream's --cert payload (cert package + --include autorun.sh; the revocation key goes
        # to OUR verifier), the runtime policy (inline, no name) made by keylime-policy, --verify
        extra_env, cert_dir, incl, marker, notice_out = cert_payload_setup(upstream, tmp_path, machine)
        host, port = machine.address
        add = await run_tool([*tenant, "-c", "add", "-t", host, "-tp", str(port), "-u", agent_id,
                              "--cert", str(cert_dir), "--include", str(incl), "--runtime-policy", str(policy),
                              "--verify"], {**env, **extra_env}, timeout=120)
        assert "Successful key derivation" in add.stdout, add.describe()
        listing = (await wait_file(marker, 10)).decode()
        assert "RevocationNotifier-cert.crt" in listing and f"{agent_id}-cert.crt" in listing, listing
        await wait_record(client, servers.verifier_url, agent_id,
                          lambda r: r["operational_state"] == GET_QUOTE and r["attestation_count"] >= 2,
                          timeout=20, what="our verifier attesting the agent")

        # status verbs, and the same policy uploaded by name (runtime policy verbs, our /allowlists)
        cvstatus, status, cvlist, _ = await run_tools(
            ([*tenant, "-c", "cvstatus", "-u", agent_id], env),
            ([*tenant, "-c", "status", "-u", agent_id], env),
            ([*tenant, "-c", "cvlist"], env),
            ([*tenant, "-c", "addruntimepolicy", "--runtime-policy-name", name, "--runtime-policy", str(policy)], env),
        )
        assert "Get Quote" in cvstatus.stdout, cvstatus.describe()
        assert "Get Quote" in status.stdout, status.describe()
        # upstream's tenant lists with `GET /agents/?verifier=` (empty value), which upstream's verifier
        # treats as "no filter" (test_upstream_servers checks upstream's side): ours lists the agent too
        assert agent_id in cvlist.stdout, cvlist.describe()
        listed = await http.request_json(client, "GET", f"{servers.verifier_url}/v2.1/agents/?verifier=")
        assert listed.results["uuids"] == [[agent_id]], listed.results
        # upstream's tenant puts PCR 10 into the mask with a runtime policy; our verifier keeps it
        record = await agent_record(client, servers.verifier_url, agent_id)
        assert int(json.loads(record["tpm_policy"])["mask"], 16) & 1 << 10, record["tpm_policy"]
        listed, shown = await run_tools(
            ([*tenant, "-c", "listruntimepolicy"], env),
            ([*tenant, "-c", "showruntimepolicy", "--runtime-policy-name", name], env),
        )
        assert name in listed.stdout, listed.describe()
        assert "Show allowlist command response: 200" in shown.stdout, shown.describe()
        await run_tool([*tenant, "-c", "deleteruntimepolicy", "--runtime-policy-name", name], env)

        # deleting the named copy must leave the agent's own (inline) policy in force
        before = await agent_record(client, servers.verifier_url, agent_id)
        # (upstream's tenant sends runtime_policy_name "" for an inline policy)
        after = await wait_record(
            client, servers.verifier_url, agent_id,
            lambda r: r["operational_state"] != GET_QUOTE or r["attestation_count"] >= before["attestation_count"] + 2,
            timeout=20, what="two attestations after deleteruntimepolicy")
        assert after["operational_state"] == GET_QUOTE and after["has_runtime_policy"] == 1, after

        # a file outside the policy: our verifier fails the agent and signs the notice with the
        # revocation key upstream's tenant sent; our agent (holding the payload's cert) verifies it
        await machine.measure("/usr/bin/not-in-policy", b"evil")
        failed = await wait_record(client, servers.verifier_url, agent_id, lambda r: r["operational_state"] == INVALID_QUOTE,
                                   timeout=20, what="Invalid Quote")
        notice = json.loads(await wait_file(notice_out, 20))
        assert notice["type"] == "revocation" and notice["agent_id"] == agent_id, notice
        assert notice["event_id"] == failed["last_event_id"], (notice, failed)

        delete, listed, gone = await run_tools(
            ([*tenant, "-c", "delete", "-u", agent_id], env),
            ([*tenant, "-c", "listruntimepolicy"], env),
            ([*tenant, "-c", "showruntimepolicy", "--runtime-policy-name", name], env),
            check=False,
        )
        assert f"Agent {agent_id} deleted from the CV" in delete.stdout, delete.describe()
        assert listed.returncode == 0 and name not in listed.stdout, listed.describe()
        assert "Show allowlist command response: 404" in gone.stdout, gone.describe()
        cvstatus, regdelete = await run_tools(
            ([*tenant, "-c", "cvstatus", "-u", agent_id], env),
            ([*tenant, "-c", "regdelete", "-u", agent_id], env),
            check=False,
        )
        assert f"Agent {agent_id} does not exist on Verifier" in cvstatus.stdout, cvstatus.describe()
        assert regdelete.returncode == 0, regdelete.describe()
        reglist = await run_tool([*tenant, "-c", "reglist"], env)
        assert agent_id not in reglist.stdout, reglist.describe()

