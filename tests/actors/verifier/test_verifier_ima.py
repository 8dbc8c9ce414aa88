"""IMA runtime policies end to end: real agents on swtpm, a real Verifier, IMA lines written with
testbed.ima_log.ImaLog on the agent's TPM. Requests are observed at the agent side through a
recording TLS proxy (verifier_support.RecordingProxy); the lines the verifier parsed per poll come
from its ``keytrio_verifier_ima_lines_per_poll`` histogram (one agent per verifier in those tests).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

from keytrio.actors.verifier import records
from keytrio.actors.verifier.ima import AgentIma
from keytrio.protocol import ima
from keytrio.protocol.ima_eval import IMA_HASH, PCR_MISMATCH
from keytrio.protocol.ima_rules import NOT_IN_ALLOWLIST, RUNTIME_POLICY_HASH, TOMTOU
from keytrio.testbed.ima_log import ImaLog
from tests.actors.verifier_support import (
    BANKS,
    BASE,
    RecordingProxy,
    RunningVerifier,
    VAgent,
    doc_b64,
    enrol,
    enrol_body,
    new_halves,
    policy_doc,
    start_test_agent,
    start_verifier,
)

pytestmark = pytest.mark.swtpm

OTHER_ID = "d432fbb3-d2f1-4a97-9ef7-75bd81c0cccc"


@dataclass
class Setup:
    a: VAgent
    rv: RunningVerifier
    log: ImaLog
    proxy: RecordingProxy

    @property
    def aid(self) -> str:
        return self.a.agent_id

    def hook(self, aid: str | None = None) -> AgentIma:
        assert self.rv.verifier.ima is not None
        return self.rv.verifier.ima.hooks[aid or self.aid]


async def setup(
    nursery: trio.Nursery, tmp: Path, pki: Any, tcti: str, doc: dict[str, Any], **opts: Any
) -> Setup:
    a = await start_test_agent(nursery, tmp / "a", pki, tcti, None)
    assert a.run.agent.tpm is not None
    log = ImaLog(a.run.ima_path, a.run.agent.tpm.extend, BANKS)
    for path, content in BASE.items():
        await log.measure(path, content)
    proxy = RecordingProxy(pki, a.address, a.run.info.mtls_cert)
    port = await nursery.start(proxy.run)
    rv = await start_verifier(nursery, pki, tmp / "verifier", **opts)
    await rv.call("POST", "/allowlists/base", {"runtime_policy": doc_b64(doc), "runtime_policy_key": "",
                                               "tpm_policy": ""})
    body = enrol_body(a, v=new_halves().v, address=("127.0.0.1", port), mtls_cert=pki.agent.pem)
    body["runtime_policy_name"] = "base"
    await enrol(rv, a.agent_id, body)
    await rv.wait(a.agent_id, lambda r: r["attestation_count"] >= 2)
    return Setup(a, rv, log, proxy)


async def tampered_line(log: ImaLog, path: str, content: bytes) -> None:
    """A line whose template-hash column is wrong, while PCR 10 is extended with the true digest."""
    entry = ima.build_entry("ima-ng", path, "sha256", hashlib.sha256(content).digest())
    bad = dataclasses.replace(entry, template_hash=hashlib.sha1(b"tampered").digest())
    with open(log.path, "a") as f:
        f.write(ima.format_line(bad) + "\n")
    await log._extend(10, {bank: ima.extend_digest(entry, bank) for bank in BANKS})


async def notice_context(rv: RunningVerifier, aid: str) -> dict[str, Any]:
    """The context of the (one) revocation notice published about ``aid`` (waits for it)."""
    with trio.fail_after(30):
        while not (found := await rv.notices(aid)):
            await trio.sleep(0.05)
    [n] = found
    msg = json.loads(n.msg)
    ctx = msg["context"]
    return json.loads(ctx) if isinstance(ctx, str) else ctx


SCENARIOS = {
    "outside": (NOT_IN_ALLOWLIST, "/usr/bin/evil"),
    "digest": (RUNTIME_POLICY_HASH, "/usr/bin/tool0"),
    "template": (IMA_HASH, "/usr/bin/tool1"),
    "behind": (PCR_MISMATCH, None),
    "tomtou": (TOMTOU, "/usr/bin/tool2"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_detected_on_first_poll(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, scenario: str
) -> None:
    s = await setup(nursery, tmp_path, pki, swtpm.tcti, policy_doc(BASE))
    before = (await s.rv.get(s.aid))["attestation_count"]
    line = len(s.log)
    hook = s.hook()  # held here: the verifier keeps a hook only while its monitor runs
    if scenario == "outside":
        await s.log.measure("/usr/bin/evil", b"evil")
    elif scenario == "digest":
        await s.log.measure("/usr/bin/tool0", b"changed content")
    elif scenario == "template":
        await tampered_line(s.log, "/usr/bin/tool1", BASE["/usr/bin/tool1"])
    elif scenario == "behind":
        assert s.a.run.agent.tpm is not None
        await s.a.run.agent.tpm.extend(10, {b: hashlib.new(b, b"unlogged").digest() for b in BANKS})
    else:
        await s.log.tomtou("/usr/bin/tool2")
    event_id, path = SCENARIOS[scenario]
    rec = await s.rv.wait_state(s.aid, records.INVALID_QUOTE)
    assert rec["last_event_id"] == event_id
    # at most the one poll in flight while the line was written passed: the next one failed
    assert rec["attestation_count"] <= before + 1
    ctx = await notice_context(s.rv, s.aid)
    if path is not None:
        assert ctx["path"] == path and ctx["line"] == line, ctx
    assert hook.progress.count == line  # the bad line was never counted as verified
    await s.rv.stop()
    await s.a.run.stop()


async def test_excluded_tomtou_ignored_incremental_restart_reboot(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keytrio.verifier")
    s = await setup(nursery, tmp_path, pki, swtpm.tcti, policy_doc(BASE, excludes=("/tmp/.*",)),
                    ignore_tomtou_errors=True)
    await s.log.measure("/tmp/scratch", b"anything")  # excluded
    await s.log.tomtou("/usr/bin/tool2")  # a warning only
    for _ in range(3):
        await s.log.measure("/usr/bin/tool0", BASE["/usr/bin/tool0"])
        count = (await s.rv.get(s.aid))["attestation_count"]
        await s.rv.wait_count(s.aid, count + 2)
    count = (await s.rv.get(s.aid))["attestation_count"]
    rec = await s.rv.wait_count(s.aid, count + 3)
    assert rec["operational_state"] == records.GET_QUOTE and rec["severity_level"] is None
    assert s.hook().progress.count == len(s.log) == 8
    assert any("event=ima.validation.tomtou severity=warning" in m for m in caplog.messages)

    # agent side: partial=0 once; ima_ml_entry never goes back and follows the log
    params = s.proxy.integrity_params()
    assert [p["partial"] for p in params].count("0") == 1 and params[0]["partial"] == "0"
    entries = [int(p["ima_ml_entry"]) for p in params]
    assert entries[0] == 0 and entries == sorted(entries) and entries[-1] == 8
    assert {3, 8} <= set(entries)
    # verifier side: 8 lines parsed in all; after catching up, a poll parses no line at all
    assert s.rv.metric("ima_lines_per_poll_sum") == 8
    zero = s.rv.metric("ima_lines_per_poll_bucket", le="0.0")
    await s.rv.wait_count(s.aid, rec["attestation_count"] + 2)
    assert s.rv.metric("ima_lines_per_poll_bucket", le="0.0") >= zero + 2
    assert s.rv.metric("ima_lines_per_poll_sum") == 8
    rec = await s.rv.get(s.aid)
    assert rec is not None

    # restart: progress comes back from the store; the first request asks for the tail only
    await s.rv.stop()
    await s.log.measure("/usr/bin/tool1", BASE["/usr/bin/tool1"])
    s.proxy.paths.clear()
    s.rv = await start_verifier(nursery, pki, tmp_path / "verifier", ignore_tomtou_errors=True)
    await s.rv.wait_count(s.aid, rec["attestation_count"] + 2)
    first = s.proxy.integrity_params()[0]
    assert (first["partial"], first["ima_ml_entry"]) == ("0", "8")  # NK again, IMA tail only
    assert s.rv.metric("ima_lines_per_poll_sum") == 1 and s.hook().progress.count == 9

    # reboot (new boottime; same log, so it replays against the same PCR 10): line 0 again, once
    s.proxy.paths.clear()
    (tmp_path / "a" / "boottime").write_text("1700000999\n")
    count = (await s.rv.get(s.aid))["attestation_count"]
    rec = await s.rv.wait_count(s.aid, count + 3)
    assert rec["operational_state"] == records.GET_QUOTE
    params = s.proxy.integrity_params()
    restarts = [p for p in params if p["partial"] == "0"]
    assert len(restarts) == 1 and restarts[0]["ima_ml_entry"] == "0"
    assert params[-1]["ima_ml_entry"] == "9" and s.hook().progress.boottime == 1700000999
    assert any("event=ima_new_boot" in m for m in caplog.messages)
    await s.rv.stop()
    await s.a.run.stop()


async def test_put_swaps_policy_for_every_agent_using_it(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    s = await setup(nursery, tmp_path, pki, swtpm.tcti, policy_doc(BASE))
    # the same agent enrolled a second time under another id, by the same name
    body = enrol_body(s.a, v=new_halves().v, address=("127.0.0.1", s.proxy.port), mtls_cert=pki.agent.pem)
    body["runtime_policy_name"] = "base"
    await enrol(s.rv, OTHER_ID, body)
    await s.rv.wait_count(OTHER_ID, 2)
    assert s.rv.metric("runtime_policy_parses_total") == 1

    # in use: cannot be deleted
    r = await s.rv.call("DELETE", "/allowlists/base", code=409)
    # upstream's text names one agent (it answers 500 when several use the policy)
    user = min(s.aid, OTHER_ID)
    assert r["status"] == f"Can't delete allowlist as it's currently in use by agent {user} (and 1 more)", r

    await s.rv.call("PUT", "/allowlists/base", {"runtime_policy": doc_b64(policy_doc({**BASE, "/usr/bin/new": b"new"})),
                                                "runtime_policy_key": "", "tpm_policy": ""})
    await s.log.measure("/usr/bin/new", b"new")
    for aid in (s.aid, OTHER_ID):
        count = (await s.rv.get(aid))["attestation_count"]
        rec = await s.rv.wait_count(aid, count + 2)
        assert rec["operational_state"] == records.GET_QUOTE
        assert s.hook(aid).progress.count == 4

    # swapped back to a policy without the new file: both agents fail on their next poll
    await s.rv.call("PUT", "/allowlists/base", {"runtime_policy": doc_b64(policy_doc(BASE)),
                                                "runtime_policy_key": "", "tpm_policy": ""})
    await s.log.measure("/usr/bin/new", b"new")
    for aid in (s.aid, OTHER_ID):
        rec = await s.rv.wait_state(aid, records.INVALID_QUOTE)
        assert rec["last_event_id"] == NOT_IN_ALLOWLIST
    # one parse per distinct policy (the second PUT's bytes equal the first upload's)
    assert s.rv.metric("runtime_policy_parses_total") == 3
    await s.rv.stop()
    await s.a.run.stop()


async def test_50k_line_log_then_cheap_polls(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    n = 50_000
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, None)
    tpm = a.run.agent.tpm
    assert tpm is not None
    entries = [ima.build_entry("ima-ng", f"/usr/lib/f{i}", "sha256", hashlib.sha256(b"%d" % i).digest())
               for i in range(n)]
    a.run.ima_path.write_text("".join(ima.format_line(e) + "\n" for e in entries))
    digests = [ima.extend_digest(e, "sha256") for e in entries]

    def extend_all(ectx: Any) -> None:  # one worker-thread call for 50,000 PCR_Extends (sha256 bank)
        for d in digests:
            v = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=d))])
            ectx.pcr_extend(ESYS_TR.PCR10, v)

    await tpm._run(extend_all)
    doc = policy_doc({})
    doc["digests"] = {e.path: [e.digest.hex()] for e in entries}
    proxy = RecordingProxy(pki, a.address, a.run.info.mtls_cert)
    port = await nursery.start(proxy.run)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", max_response_size=16 << 20,
                              max_upload_size=32 << 20)
    await rv.call("POST", "/allowlists/big", {"runtime_policy": doc_b64(doc)})
    body = enrol_body(a, v=new_halves().v, address=("127.0.0.1", port), mtls_cert=pki.agent.pem)
    body["runtime_policy_name"] = "big"
    await enrol(rv, a.agent_id, body)
    rec = await rv.wait_count(a.agent_id, 4)
    assert rec["operational_state"] == records.GET_QUOTE
    assert rv.verifier.ima is not None
    # one poll parsed the whole log, every later one nothing
    assert rv.metric("ima_lines_per_poll_sum") == n
    assert rv.metric("ima_lines_per_poll_count") - rv.metric("ima_lines_per_poll_bucket", le="0.0") == 1
    params = proxy.integrity_params()
    assert params[0]["ima_ml_entry"] == "0" and all(p["ima_ml_entry"] == str(n) for p in params[1:])
    await rv.stop()
    await a.run.stop()
