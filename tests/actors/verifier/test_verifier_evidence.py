"""``POST /verify/evidence`` and ``GET /verify/identity`` against real agent quotes (swtpm)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier import records
from keytrio.protocol.ima_eval import PCR_MISMATCH
from keytrio.protocol.ima_rules import NOT_IN_ALLOWLIST
from keytrio.protocol.quote import decode_pcr_blob, encode_pcr_blob
from keytrio.protocol.quote_check import QUOTE_VALIDATION
from keytrio.testbed.ima_log import ImaLog
from tests.actors.verifier_support import (
    BANKS,
    BASE,
    doc_b64,
    enrol,
    enrol_body,
    new_halves,
    policy_doc,
    start_test_agent,
    start_verifier,
)

pytestmark = pytest.mark.swtpm

NONCE = "abcdefghij0123456789"


async def test_evidence_matches_monitor_and_forgeries_never_valid(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, None)
    assert a.run.agent.tpm is not None
    log = ImaLog(a.run.ima_path, a.run.agent.tpm.extend, BANKS)
    for path, content in BASE.items():
        await log.measure(path, content)
    await log.measure("/root/evil.sh", b"evil")
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    public = make_client(tls.client_context([pki.ca]), timeout=20.0)  # no client cert: public routes
    root = rv.url.rsplit("/", 1)[0]

    resp = await a.run.get("/quotes/integrity", nonce=NONCE, mask="0x10400", partial="0", ima_ml_entry="0")
    q = resp.json()["results"]
    data = {
        "nonce": NONCE, "quote": q["quote"], "hash_alg": q["hash_alg"],
        "tpm_ak": base64.b64encode(a.run.info.ak_public).decode(), "tpm_ek": "",
        "tpm_policy": json.dumps({"mask": "0x400"}), "runtime_policy": json.dumps(policy_doc(BASE)),
        "mb_policy": "", "ima_measurement_list": q["ima_measurement_list"], "mb_log": "",
    }  # fmt: skip

    async def verify(d: dict[str, Any], version: str = "2.5", code: int = 200) -> dict[str, Any]:
        r = await public.post(f"{root}/v{version}/verify/evidence", json={"type": "tpm", "data": d})
        assert r.status_code == code, r.text
        return r.json()["results"]

    res = await verify(data)
    assert res["valid"] is False and res["claims"] == data
    [f] = res["failures"]
    assert f["type"] == NOT_IN_ALLOWLIST and f["context"]["path"] == "/root/evil.sh" and f["context"]["line"] == 3
    assert (await verify(data, "2.4"))["valid"] == 0

    # the monitor gives the same verdict on the same agent and policy
    await rv.call("POST", "/allowlists/base", {"runtime_policy": doc_b64(policy_doc(BASE))})
    body = enrol_body(a, v=new_halves().v)
    body["runtime_policy_name"] = "base"
    await enrol(rv, a.agent_id, body)
    rec = await rv.wait_state(a.agent_id, records.INVALID_QUOTE)
    assert rec["last_event_id"] == f["type"]

    good = {**data, "runtime_policy": json.dumps(policy_doc({**BASE, "/root/evil.sh": b"evil"}))}
    res = await verify(good)
    assert res["valid"] is True and res["failures"] == []
    assert (await verify(good, "2.4"))["valid"] == 1
    # the log cut short (behind the quote) and a wrong PCR policy
    short = {**good, "ima_measurement_list": "".join(log.lines()[0] + "\n")}
    assert [x["type"] for x in (await verify(short))["failures"]] == [PCR_MISMATCH]
    pcr = {**good, "tpm_policy": json.dumps({"10": ["00" * 32], "mask": "0x400"})}
    assert [x["type"] for x in (await verify(pcr))["failures"]] == ["pcr_validation.invalid_pcr_10"]

    # forgeries: never valid, whatever (or no) policies
    resp = await a.run.get("/quotes/integrity", nonce="other0nonce", mask="0x10400", partial="1")
    other = resp.json()["results"]["quote"]
    attest, sig, blob = good["quote"][1:].split(":")
    flipped = bytearray(base64.b64decode(sig))
    flipped[-1] ^= 1
    bank, pcrs = decode_pcr_blob(base64.b64decode(blob))
    pcrs[10] = bytes(32)  # a PCR value that the signed pcrDigest does not cover
    forged_blob = encode_pcr_blob(bank, pcrs)
    forgeries = {
        "nonce": {**good, "nonce": "wrongnonce"},
        "replayed": {**good, "quote": other},
        "signature": {**good, "quote": f"r{attest}:{base64.b64encode(bytes(flipped)).decode()}:{blob}"},
        "pcr_digest": {**good, "quote": f"r{attest}:{sig}:{base64.b64encode(forged_blob).decode()}"},
    }
    for name, forged in forgeries.items():
        bare = {**forged, "runtime_policy": "", "tpm_policy": json.dumps({"mask": "0x0"}), "ima_measurement_list": ""}
        for variant in (forged, bare):
            res = await verify(variant)
            assert res["valid"] is False, name
            assert QUOTE_VALIDATION in [x["type"] for x in res["failures"]], name

    # missing inputs, as upstream answers them: 400 default.missing_param naming the inputs
    r = await public.post(f"{root}/v2.5/verify/evidence", json={"type": "tpm", "data": {"nonce": NONCE}})
    assert r.status_code == 400
    [f] = r.json()["results"]["failures"]
    assert f["type"] == "default.missing_param"
    assert f["context"]["params"] == ["quote", "hash_alg", "tpm_ak", "tpm_ek"]
    no_ek = {k: v for k, v in good.items() if k != "tpm_ek"}
    assert [x["type"] for x in (await verify(no_ek, code=400))["failures"]] == ["default.missing_param"]
    # no policy at all: nothing to judge the evidence against (upstream: default.missing_policy)
    none = {**good, "tpm_policy": "", "runtime_policy": "", "mb_policy": ""}
    res = await verify(none, code=400)
    assert res["valid"] is False and [x["type"] for x in res["failures"]] == ["default.missing_policy"]
    # a runtime policy with an empty list is evaluated: nothing replays to the quoted PCR 10
    res = await verify({**good, "ima_measurement_list": ""})
    assert res["valid"] is False and [x["type"] for x in res["failures"]] == [PCR_MISMATCH]
    # an unknown hash algorithm (upstream's id); never valid
    res = await verify({**good, "hash_alg": "md5"})
    assert res["valid"] is False and [x["type"] for x in res["failures"]] == ["qoute_validation.invalid_hash_alg"]
    res = await verify({**good, "runtime_policy": '{"meta": {"version": 2}}'}, code=400)
    assert res["failures"][0]["type"] == "runtime_policy.invalid_param"
    assert res["failures"][0]["context"]["field"] == "runtime_policy.meta.version"
    r = await public.post(f"{root}/v2.5/verify/evidence", json={"data": good})
    assert r.status_code == 400 and r.json()["results"]["failures"][0]["type"] == "type.missing_param"

    # identity: the enrolled agent's AK
    idq = (await a.run.get("/quotes/identity", nonce=NONCE)).json()["results"]
    params = {"agent_uuid": a.agent_id, "quote": idq["quote"], "nonce": NONCE, "hash_alg": "sha256"}
    r = await public.get(f"{root}/v2.5/verify/identity", params=params)
    assert r.status_code == 200 and r.json()["results"]["valid"] == 1, r.text
    r = await public.get(f"{root}/v2.5/verify/identity", params={**params, "nonce": "other"})
    assert r.json()["results"]["valid"] == 0
    r = await public.get(f"{root}/v2.5/verify/identity",
                         params={**params, "agent_uuid": "d432fbb3-d2f1-4a97-9ef7-75bd81c0eeee"})
    assert r.status_code == 404
    r = await public.get(f"{root}/v2.5/verify/identity", params={"agent_uuid": a.agent_id})
    assert r.status_code == 400
    await public.aclose()
    await rv.stop()
    await a.run.stop()
