"""Measured boot in the verifier: /mbpolicies CRUD, enrolment by name or inline, the monitor's
evaluation (attest.evaluate, once|always) and /verify/evidence with mb_log, against a real agent
whose swtpm was extended with a synthetic UEFI boot (testbed/boot_log.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier import attest
from keytrio.actors.verifier.monitor import target_from_row
from keytrio.protocol import mb_policy as mbp
from keytrio.testbed import boot_log
from tests.actors.tenant_support import make_cli
from tests.actors.verifier_support import enrol, enrol_body, new_halves, start_test_agent, start_verifier

pytestmark = pytest.mark.swtpm

DATA = Path(__file__).parents[2] / "protocol" / "data"
GOOD = json.loads((DATA / "mb_refstate_upstream_good.json").read_text())
NONCE = "abcdefghij0123456789"
MB_MASK = hex(sum(1 << p for p in mbp.MEASUREDBOOT_PCRS))


def _other_kernel_policy() -> dict[str, Any]:
    ref = json.loads(json.dumps(GOOD))
    ref["kernels"][0]["kernel_authcode_sha256"] = "0x" + "ab" * 32
    return ref


async def _booted_agent(nursery: trio.Nursery, tmp: Path, pki: Any, swtpm: Any,
                        cfg: boot_log.BootConfig | None = None) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = cfg or boot_log.BootConfig()
    banks = ["sha1", "sha256", "sha384"]
    (tmp / "uefi.bin").write_bytes(boot_log.build(banks, cfg))
    a = await start_test_agent(nursery, tmp, pki, swtpm.tcti, None, measuredboot_ml_path=str(tmp / "uefi.bin"))
    assert a.run.agent.tpm is not None
    for pcr, digests in boot_log.events(banks, cfg):
        await a.run.agent.tpm.extend(pcr, digests)
    return a


def _row(a: Any) -> dict[str, Any]:
    return {
        "agent_id": a.agent_id, "ip": "127.0.0.1", "port": a.address[1], "mtls_cert": a.run.info.mtls_cert,
        "ak_tpm": base64.b64encode(a.run.info.ak_public).decode(), "tpm_policy": json.dumps({"mask": "0x0"}),
        "accept_tpm_hash_algs": '["sha256"]', "accept_tpm_signing_algs": '["rsassa", "ecdsa", "ecschnorr"]',
        "accept_tpm_encryption_algs": '["rsa", "ecc"]', "supported_version": "2.1",
    }  # fmt: skip


async def test_mbpolicies_crud_and_enrolment(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    a = await _booted_agent(nursery, tmp_path / "a", pki, swtpm)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    text = json.dumps(GOOD)
    assert (await rv.call("GET", "/mbpolicies/"))["results"] == {"mbpolicy names": []}
    await rv.call("POST", "/mbpolicies/good", {"mb_policy": text}, code=201)
    await rv.call("POST", "/mbpolicies/good", {"mb_policy": text}, code=409)
    await rv.call("PUT", "/mbpolicies/nope", {"mb_policy": text}, code=409)
    bad = rv.call("POST", "/mbpolicies/bad", {"mb_policy": json.dumps({"kernels": 3})}, code=400)
    assert (await bad)["results"]["field"].startswith("mb_policy")
    await rv.call("POST", "/mbpolicies/empty", {"mb_policy": ""}, code=400)
    # the empty policy is stored, as upstream does (an agent enrolled with it is not checked)
    await rv.call("POST", "/mbpolicies/empty", {"mb_policy": "{}"}, code=201)
    assert (await rv.call("GET", "/mbpolicies/empty"))["results"] == {"name": "empty", "mb_policy": "{}"}
    await rv.call("DELETE", "/mbpolicies/empty", code=204)
    got = (await rv.call("GET", "/mbpolicies/good"))["results"]
    assert got["name"] == "good" and json.loads(got["mb_policy"]) == GOOD
    await rv.call("PUT", "/mbpolicies/good", {"mb_policy": text}, code=201)
    assert (await rv.call("GET", "/mbpolicies/"))["results"] == {"mbpolicy names": ["good"]}

    # enrolment: unknown name -> 404; a bad inline policy -> 400; by name -> stored copy
    body = enrol_body(a, v=new_halves().v)
    body["mb_policy_name"] = "missing"
    await rv.call("POST", f"/agents/{a.agent_id}", body, code=404)
    body.update(mb_policy_name=None, mb_policy=json.dumps({"pk": 1}))
    await rv.call("POST", f"/agents/{a.agent_id}", body, code=400)
    body.update(mb_policy_name="good", mb_policy=None)
    await enrol(rv, a.agent_id, body)
    # the first good quote is counted before V goes out (Provide V, 5): wait for Get Quote
    rec = await rv.wait(a.agent_id, lambda r: r["attestation_count"] >= 1 and r["operational_state"] == 3)
    assert rec["has_mb_refstate"] == 1, rec
    resp = await rv.admin.delete(f"{rv.url}/mbpolicies/good")
    assert resp.status_code == 409
    await rv.call("DELETE", f"/agents/{a.agent_id}")
    resp = await rv.admin.delete(f"{rv.url}/mbpolicies/good")
    assert resp.status_code == 204
    await rv.call("GET", "/mbpolicies/good", code=404)

    # an inline policy without a name is stored under the agent's id (upstream's rule), in use
    # while the agent is enrolled, and deleted with the agent
    body.update(mb_policy_name=None, mb_policy=text)
    await enrol(rv, a.agent_id, body)
    assert (await rv.call("GET", "/mbpolicies/"))["results"] == {"mbpolicy names": [a.agent_id]}
    r = await rv.call("DELETE", f"/mbpolicies/{a.agent_id}", code=409)
    assert r["status"] == f"Can't delete mb_policy as it's currently in use by agent {a.agent_id}", r
    await rv.call("DELETE", f"/agents/{a.agent_id}")
    assert (await rv.call("GET", "/mbpolicies/"))["results"] == {"mbpolicy names": []}


async def test_monitor_fails_a_boot_the_policy_refuses(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    a = await _booted_agent(nursery, tmp_path / "a", pki, swtpm)
    # the monitor attests from rows: a row's mb_policy must reach the AgentTarget it builds
    assert target_from_row(_row(a) | {"mb_policy": json.dumps(GOOD)}).mb_policy == json.dumps(GOOD)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    body = enrol_body(a, v=new_halves().v)
    body.update(mb_policy=json.dumps(_other_kernel_policy()), mb_policy_name="other")
    await enrol(rv, a.agent_id, body)
    rec = await rv.wait(a.agent_id, lambda r: r["operational_state"] == 9)
    assert rec["last_event_id"] == "measured_boot.boot_application_not_allowed"
    # the inline policy was stored under its name
    assert json.loads((await rv.call("GET", "/mbpolicies/other"))["results"]["mb_policy"]) == _other_kernel_policy()


async def test_evaluate_once_and_always(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    a = await _booted_agent(nursery, tmp_path / "a", pki, swtpm)
    row = _row(a)
    target = target_from_row(row)
    target.mb_policy = json.dumps(GOOD)
    assert int(attest.quote_mask(target), 16) & 0xFFFF == 0xFBFF  # PCRs 0-9 and 11-15
    ctx = attest.agent_ssl_context([pki.ca], pki.client.cert, pki.client.key, a.run.info.mtls_cert)
    state = attest.AttestState()
    async with make_client(ctx) as client:
        assert await attest.attest_once(client, target, state) == []
        assert state.mb_boot is not None
        for mode, failing in (("once", False), ("always", True)):
            other = target_from_row(row)
            other.mb_policy, other.mb_evaluate = json.dumps(_other_kernel_policy()), mode
            fails = await attest.attest_once(client, other, state)
            assert bool(fails) == failing, (mode, fails)
            if failing:
                assert fails[0].event_id == "measured_boot.boot_application_not_allowed"
                assert fails[0].context["event_type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"
        # a log that does not match the quoted PCRs fails on every quote
        (a.tmp / "uefi.bin").write_bytes(boot_log.build(["sha1", "sha256", "sha384"],
                                                       boot_log.BootConfig().tampered("unknown_kernel")))
        fails = await attest.attest_once(client, target, state)
        assert {f.event_id for f in fails} == {"measured_boot.invalid_pcr_4", "measured_boot.invalid_pcr_9"}


async def test_verify_evidence_with_mb_log(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    a = await _booted_agent(nursery, tmp_path / "a", pki, swtpm, boot_log.BootConfig().tampered("dbx_missing_entry"))
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    public = make_client(tls.client_context([pki.ca]), timeout=20.0)
    root = rv.url.rsplit("/", 1)[0]
    resp = await a.run.get("/quotes/integrity", nonce=NONCE, mask=MB_MASK, partial="0", ima_ml_entry="0")
    q = resp.json()["results"]
    assert q["mb_measurement_list"]
    data = {
        "nonce": NONCE, "quote": q["quote"], "hash_alg": q["hash_alg"],
        "tpm_ak": base64.b64encode(a.run.info.ak_public).decode(), "tpm_ek": "", "tpm_policy": "",
        "runtime_policy": "", "mb_policy": json.dumps(GOOD), "ima_measurement_list": "",
        "mb_log": q["mb_measurement_list"],
    }  # fmt: skip

    async def verify(d: dict[str, Any], code: int = 200) -> dict[str, Any]:
        r = await public.post(f"{root}/v2.5/verify/evidence", json={"type": "tpm", "data": d})
        assert r.status_code == code, r.text
        return r.json()["results"]

    res = await verify(data)
    assert res["valid"] is False
    assert [f["type"] for f in res["failures"]] == ["measured_boot.dbx_missing_entries"]
    assert res["failures"][0]["context"]["event_type"] == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    good_for_this_boot = json.loads(json.dumps(GOOD))
    good_for_this_boot["dbx"] = good_for_this_boot["dbx"][1:]
    assert (await verify(data | {"mb_policy": good_for_this_boot}))["valid"] is True
    res = await verify(data | {"mb_log": ""}, code=400)
    assert [f["type"] for f in res["failures"]] == ["mb_log.missing_param"]
    res = await verify(data | {"mb_policy": json.dumps({"kernels": []})}, code=400)
    assert res["failures"][0]["type"] == "mb_policy.invalid_param"
    # a log of another boot does not replay to the quoted PCRs
    other = base64.b64encode(boot_log.build(["sha1", "sha256", "sha384"], boot_log.BootConfig())).decode()
    res = await verify(data | {"mb_log": other})
    assert [f["type"] for f in res["failures"]] == ["measured_boot.invalid_pcr_7"]
    await public.aclose()


# --- tools: keytrio policy create measured-boot, keytrio tenant mbpolicy ---------------------------


def test_policy_create_measured_boot(tmp_path: Path) -> None:
    import argparse
    import io

    from keytrio.actors.policy import cli as policy_cli

    p = argparse.ArgumentParser(prog="keytrio")
    policy_cli.register(p.add_subparsers(dest="verb", required=True))
    log = tmp_path / "log.bin"
    log.write_bytes(boot_log.build(["sha1", "sha256"], boot_log.BootConfig()))
    out, err = io.StringIO(), io.StringIO()
    args = p.parse_args(["policy", "create", "measured-boot", "--event-log", str(log), "-o", str(tmp_path / "r.json")])
    assert args.func(args, out, err) == 0, err.getvalue()
    assert json.loads((tmp_path / "r.json").read_text()) == GOOD  # what upstream's tool writes for this log
    log.write_bytes(boot_log.build(["sha256"], boot_log.BootConfig().tampered("secure_boot_off")))
    args = p.parse_args(["policy", "create", "measured-boot", "-e", str(log)])
    assert args.func(args, out, err) == 2 and "Secure Boot is disabled" in err.getvalue()
    args = p.parse_args(["policy", "create", "measured-boot", "-e", str(log), "-i"])
    assert args.func(args, out, err) == 0 and json.loads(out.getvalue())["has_secureboot"] is False


async def test_tenant_mbpolicy_verbs(world: Any, tmp_path: Path) -> None:
    cli = make_cli(world, tmp_path)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(GOOD))
    code, out, err = await cli("mbpolicy", "add", "good", "--file", ref)
    assert code == 0, err
    assert (await cli("mbpolicy", "add", "good", "--file", ref))[0] == 5  # exists: refused
    assert (await cli("mbpolicy", "update", "good", "--file", ref))[0] == 0
    code, out, _ = await cli("mbpolicy", "list", "--json")
    assert json.loads(out) == ["good"]
    code, out, _ = await cli("mbpolicy", "show", "good")
    assert json.loads(out) == GOOD
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kernels": 1}))
    assert (await cli("mbpolicy", "add", "bad", "--file", bad))[0] == 2  # refused before sending
    assert (await cli("mbpolicy", "delete", "good"))[0] == 0
    assert (await cli("mbpolicy", "delete", "good"))[0] == 5
    assert json.loads((await cli("mbpolicy", "list", "--json"))[1]) == []
