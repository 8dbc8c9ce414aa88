"""Issue 19 item 5 (first half): OUR agent in push mode under upstream Keylime 7.14.3's registrar
and its verifier in push mode (API v3.0), enrolled by upstream's tenant (``keylime_tenant -c add
--push-model``), as shared/PUSH_MODEL_WIRE.md records them.

The machine is a testbed machine (real swtpm, a real IMA log that extends PCR 10, our agent with
``mode = "push"``): it registers with upstream's registrar (v2.1, no contact), retries its PoP
session while upstream answers evaluation "fail" (not enrolled yet), and after the enrolment
attests with the quote interval upstream names. The verdicts are read as an admin reads them
(mTLS with cv_ca's client cert, ``GET /v3/agents/{id}/attestations/latest``, which answers 201
upstream): pass; then a file outside the runtime policy is measured -> fail. Upstream's push
verifier is its own instance (``KL_VERIFIER_MODE=push``: started in pull mode, restarted in push
mode, tests/interop/upstream/instance.py). Waits are hang guards on real processes, not timed asserts.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common import client as http
from keytrio.testbed.boot_log import BootConfig
from tests.interop.support import (
    Upstream,
    restart_server,
    run_tool,
    run_tools,
    running_machine,
    server_client,
    upstream_instance,
)

pytestmark = [pytest.mark.interop, pytest.mark.swtpm]


@pytest.fixture(scope="module")
def push_upstream() -> Iterator[Upstream]:
    with upstream_instance({"KL_VERIFIER_MODE": "push", "KL_QUOTE_INTERVAL": "2"},
                           prefix="keytrio-keylime-push-") as up:
        yield up


async def latest(client: Any, upstream: Upstream, agent_id: str) -> dict[str, Any]:
    """The latest attestation's attributes (+ its index from links.self) as upstream's admin API shows them."""
    reply = await client.get(f"{upstream.verifier_url}/v3/agents/{agent_id}/attestations/latest")
    assert reply.status_code in (200, 201), (reply.status_code, reply.text)  # upstream answers 201
    data = reply.json()["data"]
    return {**data["attributes"], "index": int(str(data["links"]["self"]).rsplit("/", 1)[1])}


async def wait_verdict(client: Any, upstream: Upstream, agent_id: str, pred: Any, what: str,
                       timeout: float = 90.0) -> dict[str, Any]:
    last: dict[str, Any] = {}
    with trio.move_on_after(timeout):  # hang guard
        while True:
            reply = await client.get(f"{upstream.verifier_url}/v3/agents/{agent_id}/attestations/latest")
            if reply.status_code in (200, 201):
                last = await latest(client, upstream, agent_id)
                if pred(last):
                    return last
            await trio.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout}s; last: {last}\n--- verifier log ---\n"
                         f"{upstream.log('verifier')[-4000:]}")


async def test_upstream_push_verifier_attests_our_push_agent(push_upstream: Upstream, tmp_path: Path) -> None:
    up = push_upstream
    agent_id = str(uuidlib.uuid4())
    env = dict(up.env)
    async with running_machine(
        "m-push", tmp_path, up.ca, registrar=up.registrar_agent_address, uuid=agent_id, mode="push",
        verifier_url=up.verifier_url, verifier_tls_ca_cert=str(up.ca.ca),
        backoff_initial_delay=0.5, backoff_max_delay=2.0,
    ) as machine:
        for i in range(3):
            await machine.measure(f"/usr/bin/good{i}", b"good content %d" % i)
        assert machine.agent is not None and machine.agent.push is not None
        push = machine.agent.push
        # registered with upstream's registrar without a contact; not enrolled, so every PoP
        # session is answered evaluation "fail" and the agent keeps retrying
        await push.wait_for(lambda s: s.failures >= 2)
        assert "not enrolled" in push.stats.last_error, push.stats
        assert push.stats.sessions == 0

        policy_path = tmp_path / "runtime-policy.json"
        reglist, _ = await run_tools(
            ([*up.tool("keylime_tenant"), "-c", "reglist"], env),
            ([*up.tool("keylime-policy"), "create", "runtime", "-m", str(machine.ima_path),
              "-o", str(policy_path)], env),
        )
        assert agent_id in reglist.stdout, reglist.describe()
        assert "/usr/bin/good0" in json.loads(policy_path.read_text())["digests"]
        await run_tool([*up.tool("keylime_tenant"), "-c", "add", "--push-model", "-u", agent_id,
                        "--runtime-policy", str(policy_path)], env, timeout=120)

        async with server_client(up.ca) as client:
            # upstream's registrar holds no contact for a push agent
            reg = await http.request_json(client, "GET", f"{up.registrar_tls_url}/v2.1/agents/{agent_id}")
            assert (reg.results.get("ip"), reg.results.get("port"), reg.results.get("mtls_cert")) == (None, None, None)

            passed = await wait_verdict(client, up, agent_id,
                                        lambda a: a["stage"] == "verification_complete" and a["evaluation"] == "pass",
                                        "passed attestation")
            # and it keeps attesting at upstream's interval, each one passing
            again = await wait_verdict(client, up, agent_id,
                                       lambda a: a["index"] >= passed["index"] + 2
                                       and a["stage"] == "verification_complete", "two more attestations")
            assert again["evaluation"] == "pass", again
            assert push.stats.sessions >= 1 and push.stats.accepted >= 3, push.stats

            # upstream's verifier restarted (in push mode again): the agent backs off while it is
            # down and resumes by itself; attestations pass again
            failures, sessions = push.stats.failures, push.stats.sessions
            await restart_server(up, "verifier")
            resumed = await wait_verdict(client, up, agent_id,
                                         lambda a: a["index"] >= again["index"] + 3
                                         and a["stage"] == "verification_complete", "attestations after a restart")
            assert resumed["evaluation"] == "pass", resumed
            print(f"[interop] across the restart: {push.stats.failures - failures} failed cycles, "
                  f"{push.stats.sessions - sessions} new sessions")
            again = resumed

            # a file outside the runtime policy: the next evidence fails upstream's policy check
            tampered_from = push.stats.accepted
            await machine.measure("/usr/bin/not-in-policy", b"evil")
            failed = await wait_verdict(client, up, agent_id,
                                        lambda a: a["stage"] == "verification_complete" and a["evaluation"] == "fail",
                                        "failed attestation")
            assert failed["index"] > again["index"], failed
            assert "policy violations" in up.log("verifier"), up.log("verifier")[-3000:]
            assert push.stats.accepted > tampered_from

        await run_tool([*up.tool("keylime_tenant"), "-c", "delete", "-u", agent_id], env, check=False)


async def test_upstream_push_verifier_asks_our_agent_for_the_uefi_log(push_upstream: Upstream, tmp_path: Path) -> None:
    """Enrolled with a measured-boot reference state, upstream's push verifier asks for the UEFI log
    (PUSH_MODEL_WIRE.md item 13, not observed there): our agent announces it as
    ``application/octet-stream`` with ``entry_count`` = its size and sends it whole, base64; upstream
    replays it against the quoted PCRs and the attestation passes."""
    up = push_upstream
    agent_id = str(uuidlib.uuid4())
    env = dict(up.env)
    async with running_machine(
        "m-push-mb", tmp_path, up.ca, registrar=up.registrar_agent_address, uuid=agent_id, mode="push",
        verifier_url=up.verifier_url, verifier_tls_ca_cert=str(up.ca.ca), boot=BootConfig(),
        backoff_initial_delay=0.5, backoff_max_delay=2.0,
    ) as machine:
        refstate = tmp_path / "refstate.json"
        await run_tool([*up.tool("keylime-policy"), "create", "measured-boot", "-e", str(machine.boot_log_path),
                        "-o", str(refstate)], env)
        await run_tool([*up.tool("keylime_tenant"), "-c", "add", "--push-model", "-u", agent_id,
                        "--mb-policy", str(refstate)], env, timeout=120)
        async with server_client(up.ca) as client:
            passed = await wait_verdict(client, up, agent_id,
                                        lambda a: a["stage"] == "verification_complete", "a verdict")
            kinds = {e["evidence_type"]: e for e in passed["evidence"]}
            assert "uefi_log" in kinds, passed
            quote = kinds["tpm_quote"]["chosen_parameters"]
            print(f"[interop] upstream asked for PCRs {quote['selected_subjects']} and "
                  f"{kinds['uefi_log']['chosen_parameters']}")
            assert passed["evaluation"] == "pass", (passed, up.log("verifier")[-3000:])
            sent = kinds["uefi_log"]["data"]["entries"]
            assert sent and len(sent) >= machine.boot_log_path.stat().st_size, kinds["uefi_log"]
        await run_tool([*up.tool("keylime_tenant"), "-c", "delete", "-u", agent_id], env, check=False)
