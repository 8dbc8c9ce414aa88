"""The tenant and push-mode agents (API v3.0), end to end on real sockets: our registrar, our
verifier serving pull and push (``mode = both``), a real push agent on swtpm that listens on no
port, and ``keytrio tenant add --push`` / ``keytrio tenant attestations`` run in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.agent.actor import Agent
from keytrio.actors.tenant import ops, push
from keytrio.actors.tenant.cli_output import format_status
from keytrio.actors.verifier.actor import Verifier
from keytrio.actors.verifier.config import load_config as verifier_config
from tests.actors.registrar_support import registrar_config, running_registrar
from tests.actors.tenant_support import Cli, tls_layout, write_config

AGENT_ID = "5c0b3b6e-0000-4000-8000-0000000000a1"
UNKNOWN = "5c0b3b6e-0000-4000-8000-0000000000ff"


def _push_agent_options(tmp: Path, swtpm: Any, pki: Any, registrar_port: int, verifier_url: str) -> dict[str, Any]:
    boot = tmp / "boottime"
    boot.write_text("1767225600\n")
    ima = tmp / "ima"
    ima.write_text("10 " + "00" * 20 + " ima-ng sha256:" + "11" * 32 + " boot_aggregate\n")
    return {"mode": "push", "tcti": swtpm.tcti, "uuid": AGENT_ID, "data_dir": str(tmp / "agent"),
            "registrar_ip": "127.0.0.1", "registrar_port": registrar_port, "retry_interval": 0.2,
            "verifier_url": verifier_url, "verifier_tls_ca_cert": str(pki.ca), "tpm_hash_alg": "sha256",
            "boottime_source": str(boot), "ima_ml_path": str(ima), "measuredboot_ml_path": str(tmp / "none"),
            "backoff_initial_delay": 0.1, "backoff_max_delay": 0.5, "secure_mount": "never"}


async def _history(cli: Cli) -> list[dict[str, Any]]:
    code, out, err = await cli("attestations", AGENT_ID, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.swtpm
async def test_tenant_enrols_a_push_agent_and_reads_its_history(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    async with running_registrar(registrar_config(pki, tmp_path / "registrar"), pki) as reg:
        verifier = Verifier(verifier_config(None, env={}, overrides={
            "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "verifier"),
            "server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
            "trusted_client_ca": [str(pki.ca)], "trusted_server_ca": [str(pki.ca)],
            "client_cert": str(pki.client.cert), "client_key": str(pki.client.key),
            "mode": "both", "quote_interval": 0.3, "graceful_timeout": 0.5,
        }))
        host, port = await nursery.start(verifier.run)
        verifier_url = f"https://{host}:{port}"
        tls_dir = tls_layout(tmp_path / "cv_ca", pki)
        cli = Cli(write_config(tmp_path / "tenant.toml", tls_dir, reg.https_url, require_ek_cert=False),
                  ["--verifier", f"{host}:{port}"])

        # refusals first: nothing is enrolled by any of them
        code, _, err = await cli("add", "--push", UNKNOWN)
        assert code == 5 and "404" in err, err  # not at the registrar
        payload = tmp_path / "payload.txt"
        payload.write_text("x")
        agent = Agent.from_options(**_push_agent_options(tmp_path, swtpm, pki, reg.addresses.http[1], verifier_url))
        await nursery.start(agent.run)  # registers (no contact address) and keeps asking the verifier
        code, _, err = await cli("add", "--push", AGENT_ID, "--payload", str(payload))
        assert code == 2 and "no payload" in err, err
        code, _, err = await cli("attestations", AGENT_ID)
        assert code == 5 and "404" in err, err  # not enrolled yet: the verifier knows no such agent
        code, out, _ = await cli("list", "--json")
        assert json.loads(out)["verifier"] == []

        # enrolled as a pull agent by mistake: the registrar record (no contact, no mTLS cert) says
        # what it is, and the line says how to enrol it
        code, _, err = await cli("add", AGENT_ID, "--no-ek-check")
        assert code == 4 and "registered as a push-mode agent" in err, err
        assert f"`keytrio tenant add --push {AGENT_ID}`" in err, err
        code, out, _ = await cli("list", "--json")
        assert json.loads(out)["verifier"] == []

        code, out, err = await cli("add", "--push", AGENT_ID)
        assert code == 0 and "push mode" in out and "warning" not in err, (out, err)
        code, out, _ = await cli("status", AGENT_ID, "--json")
        rec = json.loads(out)["verifier"]
        assert (rec["ip"], rec["port"]) == (None, None), rec
        assert "latest_attestation" in json.loads(out)  # None until the first attestation

        # the agent's next session passes; its attestations show up, verified, newest first
        with trio.fail_after(60):
            while not any(a.get("evaluation") == "pass" for a in await _history(cli)):
                await trio.sleep(0.1)
        items = await _history(cli)
        assert all(isinstance(a["index"], int) for a in items), items
        assert items == sorted(items, key=lambda a: a["index"], reverse=True)
        code, out, _ = await cli("attestations", AGENT_ID)
        assert code == 0 and " pass" in out and out.startswith("#"), out
        # status shows the latest attestation next to the v2 record (the agent keeps attesting)
        code, out, err = await cli("status", AGENT_ID, "--json")
        assert code == 0, err
        latest = json.loads(out)["latest_attestation"]
        assert latest["index"] >= items[0]["index"] and latest["stage"] and latest["evaluation"], latest
        code, out, err = await cli("status", AGENT_ID)
        assert code == 0, err
        line = next(ln for ln in out.splitlines() if ln.startswith("latest"))
        assert "push attestation #" in line and "stage " in line and "evaluation " in line, out

        # deleting it at the verifier ends its history there
        code, _, err = await cli("delete", AGENT_ID)
        assert code == 0, err
        code, _, err = await cli("attestations", AGENT_ID)
        assert code == 5, err
        nursery.cancel_scope.cancel()


def test_attestation_items_without_data_id_take_the_index_from_links() -> None:
    # upstream's resources carry no data.id, only links.self (and its /3/... path lacks the v)
    item = {"type": "attestation", "attributes": {"stage": "verification_complete", "evaluation": "fail"},
            "links": {"self": "/3/agents/x/attestations/7"}}
    assert push._attestation(item) == {"index": 7, "stage": "verification_complete", "evaluation": "fail"}
    assert push._attestation({**item, "id": "3"})["index"] == 3
    assert push.format_attestations([]) == ["no attestations yet"]
    line = push.format_attestations([{"index": 2, "stage": "verification_complete", "evaluation": "fail",
                                      "failure_reason": "policy_violation"}])[0]
    assert line == "#2 verification_complete fail (policy_violation)"


def test_status_lines_of_push_and_pull_agents() -> None:
    rec = {"operational_state": 3, "ip": None, "port": None, "verifier_id": "default"}
    assert ops.is_push_record(rec) and not ops.is_push_record({**rec, "ip": "10.0.0.2", "port": 9002})
    failed = {"index": 4, "stage": "verification_complete", "evaluation": "fail",
              "failure_reason": "policy_violation"}
    text = format_status({"agent_id": AGENT_ID, "registrar": None, "verifier": rec, "latest_attestation": failed})
    assert ("latest       push attestation #4: stage verification_complete, evaluation fail,"
            " failure policy_violation") in text.splitlines(), text
    text = format_status({"agent_id": AGENT_ID, "registrar": None, "verifier": rec, "latest_attestation": None})
    assert "latest       push agent, no attestation yet" in text.splitlines(), text
    # the registrar line: a push agent registered no contact address
    reg = {"ip": None, "port": None, "regcount": 1}
    text = format_status({"agent_id": AGENT_ID, "registrar": reg, "verifier": None})
    assert "registrar    registered, no contact address (it dials out: a push agent), regcount 1" in text, text
    text = format_status({"agent_id": AGENT_ID, "registrar": {**reg, "ip": "10.0.0.2", "port": 9002}, "verifier": None})
    assert "registrar    registered, contact 10.0.0.2:9002, regcount 1" in text, text
    # a pull agent's status has no such line (ops.status adds the key for push records only)
    pull = {**rec, "ip": "10.0.0.2", "port": 9002}
    assert "latest" not in format_status({"agent_id": AGENT_ID, "registrar": None, "verifier": pull})
