"""Directions 1 and 3 of issue 9: our agent under upstream Keylime 7.14.3's registrar and verifier,
enrolled once by upstream's tenant (``keylime_tenant``) and once by our tenant library.

Certificates: upstream's own ``cv_ca`` (made by its verifier, ``tls_dir = generate``) is the
server-components CA; our agent trusts its ``cacert.crt``.

Revocation (direction 1): upstream's tenant, given ``--cert DIR``, uses upstream's ca_util CA in
DIR (created by ``ca_util.cmd_init`` when absent, keystore encrypted with ``[ca] password``),
creates ``DIR/RevocationNotifier-private.pem`` + ``-cert.crt`` when missing, puts the cert into the
payload zip as ``RevocationNotifier-cert.crt`` (with ``DIR/<uuid>-cert.crt``, its key,
``cacert.crt`` and the ``--include`` files) and sends the private key to the verifier as
``revocation_key``. The verifier signs each notice with it; our agent verifies with the cert from
the payload.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from keytrio.actors.common import client as http
from keytrio.actors.tenant.payload import make_payload
from keytrio.actors.tenant.tenant import Tenant
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

async def test_upstream_tenant_and_verifier_attest_our_agent(upstream: Upstream, tmp_path: Path) -> None:
    agent_id = str(uuidlib.uuid4())
    async with running_machine("m-up1", tmp_path, upstream.ca, registrar=upstream.registrar_agent_address,
                               uuid=agent_id) as machine:
        for i in range(3):
            await machine.measure(f"/usr/bin/good{i}", b"good content %d" % i)
        env = dict(upstream.env)

        # registered + activated with upstream's registrar; a runtime policy made by upstream's
        # own tool from the machine's IMA list
        policy_path = tmp_path / "runtime-policy.json"
        reglist, _ = await run_tools(
            ([*upstream.tool("keylime_tenant"), "-c", "reglist"], env),
            ([*upstream.tool("keylime-policy"), "create", "runtime", "-m", str(machine.ima_path),
              "-o", str(policy_path)], env),
        )
        assert agent_id in reglist.stdout, reglist.describe()
        policy = json.loads(policy_path.read_text())
        assert "/usr/bin/good0" in policy["digests"], policy

        # payload: upstream's cert package (+ an autorun.sh via --include); revocation pair in cert_dir
        extra_env, cert_dir, incl, marker, notice_out = cert_payload_setup(upstream, tmp_path, machine)
        host, port = machine.address
        add = await run_tool(
            [*upstream.tool("keylime_tenant"), "-c", "add", "-t", host, "-tp", str(port), "-u", agent_id,
             "--cert", str(cert_dir), "--include", str(incl), "--runtime-policy", str(policy_path),
             "--verify"],
            {**env, **extra_env}, timeout=120,
        )
        assert "Successful key derivation" in add.stdout + add.stderr, add.describe()

        # the payload arrived: autorun.sh ran in the unpacked cert package
        listing = (await wait_file(marker, 10)).decode()
        assert "RevocationNotifier-cert.crt" in listing and "autorun.sh" in listing, listing

        # upstream's verifier attests our agent: Get Quote, attestation_count rising
        async with server_client(upstream.ca) as client:
            first = await wait_record(client, upstream.verifier_url, agent_id,
                                      lambda r: r["operational_state"] == GET_QUOTE and r["attestation_count"] >= 1,
                                      timeout=30, what="Get Quote with a first attestation")
            later = await wait_record(client, upstream.verifier_url, agent_id,
                                      lambda r: r["attestation_count"] >= first["attestation_count"] + 2,
                                      timeout=30, what="two more attestations")
            assert later["operational_state"] == GET_QUOTE, later
            # upstream's tenant ORs PCR 10 into the mask with a runtime policy (ours must do the same:
            # test_our_tenant_against_upstream_servers)
            assert pcr_mask(later) & 1 << 10, later["tpm_policy"]
            cvstatus, cvlist = await run_tools(
                ([*upstream.tool("keylime_tenant"), "-c", "cvstatus", "-u", agent_id], env),
                ([*upstream.tool("keylime_tenant"), "-c", "cvlist"], env),
            )
            assert "Get Quote" in cvstatus.stdout, cvstatus.describe()
            # cvlist sends `GET /agents/?verifier=` (empty): upstream's verifier takes it as no filter
            # (ours must do the same: test_upstream_tenant_against_our_registrar_and_verifier)
            assert agent_id in cvlist.stdout, cvlist.describe()
            listed = await http.request_json(client, "GET", f"{upstream.verifier_url}/v2.1/agents/?verifier=")
            assert [agent_id] in listed.results["uuids"], listed.results

            # a file outside the policy: Invalid Quote, and a signed notice reaches our agent
            await machine.measure("/usr/bin/not-in-policy", b"evil")
            failed = await wait_record(client, upstream.verifier_url, agent_id,
                                       lambda r: r["operational_state"] == INVALID_QUOTE,
                                       timeout=30, what="Invalid Quote")
            assert "not_in_allowlist" in str(failed.get("last_event_id")), failed

        notice = json.loads(await wait_file(notice_out, 30))
        assert notice["type"] == "revocation" and notice["agent_id"] == agent_id, notice
        assert "not_in_allowlist" in notice["event_id"], notice
        # our agent refuses unsigned/badly signed notices once it holds a revocation cert, so the
        # action ran on a notice signed with the pair upstream's tenant made in cert_dir
        unpacked = machine.dir / "agent-data" / "secure" / "unzipped" / "RevocationNotifier-cert.crt"
        assert unpacked.read_bytes().strip() == (cert_dir / "RevocationNotifier-cert.crt").read_bytes().strip()

        delete = await run_tool([*upstream.tool("keylime_tenant"), "-c", "delete", "-u", agent_id], env)
        assert delete.returncode == 0


def pcr_mask(record: dict[str, Any]) -> int:
    """The PCR mask of a verifier record's tpm_policy."""
    return int(json.loads(record["tpm_policy"])["mask"], 16)


def hand_written_policy(ima_path: Path) -> dict[str, Any]:
    """A runtime policy in upstream's JSON format (meta.version 1), from an ima-ng ASCII list."""
    digests: dict[str, list[str]] = {}
    for line in ima_path.read_text().splitlines():
        _pcr, _template_hash, template, digest, path = line.split(" ", 4)
        assert template == "ima-ng", line
        digests.setdefault(path, []).append(digest.split(":", 1)[1])
    return {
        # generator 3 (LegacyAllowList, what keylime-policy writes): upstream's verifier reports
        # has_runtime_policy only for generator > 1 (EmptyAllowList)
        "meta": {"version": 1, "generator": 3, "timestamp": ""},
        "release": 0,
        "digests": digests,
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


async def test_our_tenant_against_upstream_servers(upstream: Upstream, tmp_path: Path) -> None:
    agent_id = str(uuidlib.uuid4())
    ca = upstream.ca
    async with running_machine("m-up3", tmp_path, ca, registrar=upstream.registrar_agent_address,
                               uuid=agent_id) as machine:
        await machine.measure("/usr/bin/fine", b"fine")
        policy = json.dumps(hand_written_policy(machine.ima_path))
        marker = tmp_path / "autorun-ran"
        payload = make_payload(autorun=f"#!/bin/sh\ncat secret.txt > '{marker}'\n",
                               extra={"secret.txt": "from keytrio's tenant\n"})
        async with Tenant(upstream.registrar_tls_url, upstream.verifier_url, ca_files=[ca.ca],
                          client_cert=ca.client_cert, client_key=ca.client_key) as tenant, \
                server_client(ca) as client:
            assert agent_id in await tenant.reglist()
            result = await tenant.add(agent_id, runtime_policy=policy, payload=payload, timeout=30)
            assert result.verified and result.operational_state == GET_QUOTE, result
            assert (await wait_file(marker, 10)).decode() == "from keytrio's tenant\n"

            # upstream's verifier keeps attesting with the hand-written policy
            first = await agent_record(client, upstream.verifier_url, agent_id)
            assert first["has_runtime_policy"] == 1, first
            await wait_record(client, upstream.verifier_url, agent_id,
                              lambda r: r["attestation_count"] >= first["attestation_count"] + 2,
                              timeout=30, what="two more attestations")
            status = await tenant.status(agent_id)
            assert status["operational_state"] == GET_QUOTE, status
            assert status["registrar"] is not None and status["verifier"]["attestation_count"] >= 2, status
            assert agent_id in await tenant.list()

            # the runtime policy is enforced: our tenant put PCR 10 into tpm_policy's mask (as upstream's
            # tenant does whenever a runtime policy is given: upstream's verifier quotes only the mask's
            # PCRs, so without it the IMA list would never be checked), and a file outside the policy
            # makes upstream's verifier fail the agent
            assert pcr_mask(first) & 1 << 10, first["tpm_policy"]
            await machine.measure("/usr/bin/not-in-policy", b"evil")
            failed = await wait_record(client, upstream.verifier_url, agent_id,
                                       lambda r: r["operational_state"] == INVALID_QUOTE,
                                       timeout=30, what="Invalid Quote for a file outside our tenant's policy")
            assert "not_in_allowlist" in str(failed.get("last_event_id")), failed

            await tenant.delete(agent_id)
            assert agent_id not in await tenant.list()
            status = await tenant.status(agent_id)
            assert status["verifier"] is None and status["registrar"] is not None, status

