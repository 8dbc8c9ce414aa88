"""The Verifier actor end to end: real agents on swtpm over real mTLS, a real Verifier on SQLite.

Every wait polls the verifier's GET (verifier_support.RunningVerifier.wait); trio.fail_after only
guards against hangs. Intervals are short (quote 0.2 s, retry 0.1 s, max_retries 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.verifier import records
from keytrio.actors.verifier.monitor import COMM_ERROR, COMM_MALFORMED
from keytrio.protocol import revocation
from keytrio.protocol.ima_eval import ImaProgress
from keytrio.protocol.quote_check import QUOTE_VALIDATION
from keytrio.protocol.wire import INVALID_DATA
from keytrio.testbed.ima_log import ImaLog
from tests.actors.verifier_support import (
    HostileAgent,
    Relay,
    RevocationPair,
    RunningVerifier,
    VAgent,
    Webhook,
    enrol,
    enrol_body,
    new_halves,
    post_u_and_verify,
    revocation_pair,
    start_test_agent,
    start_verifier,
    wait_notices,
)

pytestmark = pytest.mark.swtpm

ZERO32 = "00" * 32
OTHER_ID = "d432fbb3-d2f1-4a97-9ef7-75bd81c0aaaa"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> RevocationPair:
    return revocation_pair(tmp_path_factory.mktemp("revocation"))


async def check_received(
    agents: list[VAgent], rv: RunningVerifier, pair: RevocationPair, failing: str, event_id: str
) -> None:
    """Every agent recorded the (one) notice about ``failing``, and its signature verifies."""
    [notice] = await rv.notices(failing)
    parsed = revocation.verify_notice(pair.cert_pem, notice.msg, notice.signature)
    assert parsed["agent_id"] == failing and parsed["event_id"] == event_id
    assert parsed["notice_id"] == notice.notice_id
    for a in agents:
        assert notice.msg in a.notices(), (a.agent_id, event_id)


async def test_enrol_v_and_policy_failures_notify_every_agent(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, swtpm_factory: Any, pair: RevocationPair
) -> None:
    other_tpm = await swtpm_factory(fresh=False)
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair)
    b = await start_test_agent(nursery, tmp_path / "b", pki, other_tpm.tcti, pair)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    ha, hb = new_halves(), new_halves()
    await enrol(rv, a.agent_id, enrol_body(a, v=ha.v, revocation_key=pair.key_pem,
                                            tpm_policy={"15": [ZERO32], "mask": "0x8000"}))
    await enrol(rv, b.agent_id, enrol_body(b, v=hb.v, revocation_key=pair.key_pem))

    # enrol -> GET_QUOTE, attestation_count rising, V delivered (U + V -> the right K)
    for agent in (a, b):
        rec = await rv.wait(agent.agent_id, lambda r: r["operational_state"] == records.GET_QUOTE
                            and r["attestation_count"] >= 3)
        assert rec["hash_alg"] == "sha256" and rec["sign_alg"] == "rsassa"
        assert rec["last_successful_attestation"] > 0 and rec["severity_level"] is None
    await post_u_and_verify(a, ha)
    await post_u_and_verify(b, hb)

    # a quote signed by another AK: enrol a's address under another id with b's AK
    await enrol(rv, OTHER_ID, enrol_body(a, v=ha.v, revocation_key=pair.key_pem, ak_public=b.run.info.ak_public))
    rec = await rv.wait_state(OTHER_ID, records.INVALID_QUOTE)
    assert rec["last_event_id"] == QUOTE_VALIDATION and rec["attestation_count"] == 0
    await wait_notices(a, 1)
    await wait_notices(b, 1)
    await check_received([a, b], rv, pair, OTHER_ID, QUOTE_VALIDATION)
    assert len(a.notices()) == 1  # a got it twice (its own row + OTHER_ID's): acted on once

    # a changed policy PCR on a
    count_b = (await rv.get(b.agent_id))["attestation_count"]
    assert a.run.agent.tpm is not None
    await a.run.agent.tpm.extend(15, {"sha256": hashlib.sha256(b"changed").digest()})
    rec = await rv.wait_state(a.agent_id, records.INVALID_QUOTE)
    assert rec["last_event_id"] == "pcr_validation.invalid_pcr_15"
    await wait_notices(a, 2)
    await wait_notices(b, 2)
    await check_received([a, b], rv, pair, a.agent_id, "pcr_validation.invalid_pcr_15")
    # b is unaffected and keeps being attested
    await rv.wait(b.agent_id, lambda r: r["attestation_count"] >= count_b + 2
                  and r["operational_state"] == records.GET_QUOTE)

    # a wrong PCR 16 on b
    assert b.run.agent.tpm is not None
    await b.run.agent.tpm.extend(16, {"sha256": hashlib.sha256(b"other nk").digest()})
    rec = await rv.wait_state(b.agent_id, records.INVALID_QUOTE)
    assert rec["last_event_id"] == "pcr_validation.invalid_pcr_16"
    await wait_notices(a, 3)
    await wait_notices(b, 3)
    await check_received([a, b], rv, pair, b.agent_id, "pcr_validation.invalid_pcr_16")
    assert rv.verifier.monitors is not None and rv.verifier.monitors.running == set()

    await rv.stop()
    await a.run.stop()
    await b.run.stop()


async def test_agent_killed_retry_failed_then_reactivate(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, pair: RevocationPair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="keytrio.verifier")
    hook = Webhook()
    await nursery.start(hook.run)
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", retry_interval=0.3, webhook_url=hook.url)
    await enrol(rv, a.agent_id, enrol_body(a, v=new_halves().v, revocation_key=pair.key_pem))
    await rv.wait_count(a.agent_id, 2)
    port = a.address[1]

    await a.run.stop()
    seen: list[int] = []

    def record(r: dict[str, Any]) -> bool:
        if not seen or seen[-1] != r["operational_state"]:
            seen.append(r["operational_state"])
        return r["operational_state"] == records.FAILED

    rec = await rv.wait(a.agent_id, record)
    assert records.GET_QUOTE_RETRY in seen and seen[-1] == records.FAILED, seen
    assert rec["last_event_id"] == COMM_ERROR
    retries = [m for m in caplog.messages if f"agent={a.agent_id} event=retry" in m]
    assert [m.split("attempt=")[1].split()[0] for m in retries] == ["1", "2", "3"]  # max_retries
    # the comm_error notice went to the webhook (a is down), signed
    with trio.fail_after(30):
        while not hook.bodies:
            await trio.sleep(0.05)
    body = hook.bodies[0]
    msg = revocation.verify_notice(pair.cert_pem, body["msg"], body["signature"])
    assert msg["event_id"] == COMM_ERROR and msg["agent_id"] == a.agent_id

    # back on the same data dir / TPM / port, reactivate -> GET_QUOTE, counting again, V again
    a2 = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair, port=port)
    assert a2.agent_id == a.agent_id
    await rv.call("PUT", f"/agents/{a.agent_id}/reactivate")
    rec = await rv.wait(a.agent_id, lambda r: r["operational_state"] == records.GET_QUOTE
                        and r["attestation_count"] >= rec["attestation_count"] + 2)
    await rv.stop()
    await a2.run.stop()


async def test_stop_delete_readd(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, pair: RevocationPair
) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair)
    rx, ry = Relay(a.address), Relay(a.address)
    px, py = await nursery.start(rx.run), await nursery.start(ry.run)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    x, y = a.agent_id, OTHER_ID  # the same agent enrolled twice, each record behind its own relay
    v = new_halves().v
    await enrol(rv, x, enrol_body(a, v=v, address=("127.0.0.1", px)))
    await enrol(rv, y, enrol_body(a, v=v, address=("127.0.0.1", py)))
    await rv.wait_count(x, 2)
    await rv.wait_count(y, 2)
    assert rx.bytes_up > 0 and ry.bytes_up > 0
    ms = rv.verifier.monitors
    assert ms is not None

    # stop x: state 10 and its monitor is gone when the PUT returns; no request reaches x again
    await rv.call("PUT", f"/agents/{x}/stop")
    assert x not in ms.running
    with trio.fail_after(30):
        while rx.open:  # the monitor closed its keep-alive connection
            await trio.sleep(0.05)
    stopped_bytes = rx.bytes_up
    count_x = (await rv.get(x))["attestation_count"]
    count_y = (await rv.get(y))["attestation_count"]
    await rv.wait_count(y, count_y + 3)  # y's polls are the clock
    rec = await rv.get(x)
    assert rec is not None and rec["operational_state"] == records.TENANT_FAILED
    assert rec["attestation_count"] == count_x
    assert rx.bytes_up == stopped_bytes and rx.open == 0

    # reactivate x (it becomes the clock), then delete y: monitor ends at once, no more requests
    await rv.call("PUT", f"/agents/{x}/reactivate")
    await rv.wait(x, lambda r: r["operational_state"] == records.GET_QUOTE and r["attestation_count"] > count_x)
    await rv.call("DELETE", f"/agents/{y}")
    assert y not in ms.running
    assert await rv.get(y) is None
    with trio.fail_after(30):
        while ry.open:
            await trio.sleep(0.05)
    deleted_bytes = ry.bytes_up
    count_x = (await rv.get(x))["attestation_count"]
    await rv.wait_count(x, count_x + 3)
    assert ry.bytes_up == deleted_bytes

    # re-add y: monitored again from scratch
    await enrol(rv, y, enrol_body(a, v=v, address=("127.0.0.1", py)))
    rec = await rv.wait(y, lambda r: r["attestation_count"] >= 2 and r["operational_state"] == records.GET_QUOTE)
    assert ry.bytes_up > deleted_bytes
    await rv.stop()
    await a.run.stop()


async def test_verifier_restart_resumes_without_rereading_ima(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, pair: RevocationPair
) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair)
    assert a.run.agent.tpm is not None
    log = ImaLog(a.run.ima_path, a.run.agent.tpm.extend, ["sha1", "sha256", "sha384"])
    for i in range(4):
        await log.measure(f"/usr/bin/tool{i}", f"content {i}".encode())
    calls: list[tuple[int, int]] = []  # (first entry asked, lines received)

    class CountingIma:
        """An ImaHook that counts lines only (no replay), its progress restored from the row."""

        def __init__(self, count: int) -> None:
            self.progress = ImaProgress(count=count)

        def __call__(self, ml: str | None, entry: int, pcrs: dict[int, bytes], bank: str) -> tuple[list[Any], int]:
            lines = (ml or "").splitlines()
            calls.append((entry, len(lines)))
            self.progress = ImaProgress(count=entry + len(lines))
            return [], self.progress.count

        def for_boot(self, boottime: int | None, reset_count: int | None) -> None:
            pass

        def progress_json(self) -> str:
            return json.dumps(self.progress.to_json())

    def ima_check_for(row: dict[str, Any]) -> Any:
        return CountingIma(int(row.get("next_ima_ml_entry") or 0))

    data = tmp_path / "verifier"
    rv = await start_verifier(nursery, pki, data, ima_check_for=ima_check_for)
    await enrol(rv, a.agent_id, enrol_body(a, v=new_halves().v))
    rec = await rv.wait_count(a.agent_id, 3)
    assert calls[0] == (0, 4) and all(c == (4, 0) for c in calls[1:])
    await rv.stop()

    await log.measure("/usr/bin/late", b"late")
    calls.clear()
    rv2 = await start_verifier(nursery, pki, data, ima_check_for=ima_check_for)
    rec2 = await rv2.wait_count(a.agent_id, rec["attestation_count"] + 2)
    assert rec2["operational_state"] == records.GET_QUOTE
    assert calls[0] == (4, 1), calls  # resumed at the stored entry: only the new line was sent
    assert json.loads(rec2["tpm_policy"]) == {"mask": "0x0"}
    await rv2.stop()
    await a.run.stop()


async def test_hostile_agents_fail_and_others_keep_running(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, pair: RevocationPair
) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    await enrol(rv, a.agent_id, enrol_body(a, v=new_halves().v, revocation_key=pair.key_pem))
    await rv.wait_count(a.agent_id, 1)
    expected = {"garbage": (records.FAILED, COMM_MALFORMED),
                "huge": (records.FAILED, COMM_MALFORMED),
                "wrong_types": (records.INVALID_QUOTE, INVALID_DATA)}  # upstream's id for an unreadable reply
    ids = {}
    for i, mode in enumerate(expected):
        h = HostileAgent(mode)
        port = await nursery.start(h.run, pki)
        aid = f"d432fbb3-d2f1-4a97-9ef7-75bd81c0b00{i}"
        ids[mode] = (aid, h)
        await enrol(rv, aid, enrol_body(a, v=new_halves().v, revocation_key=pair.key_pem,
                                        address=("127.0.0.1", port), mtls_cert=pki.agent.pem))
    for mode, (state, event_id) in expected.items():
        aid, h = ids[mode]
        rec = await rv.wait_state(aid, state)
        assert rec["last_event_id"] == event_id, mode
        # (other hostile agents' notices reach it too: it is an agent of this verifier)
        assert any("/quotes/integrity" in p for p in h.paths), h.paths
    count = (await rv.get(a.agent_id))["attestation_count"]
    rec = await rv.wait_count(a.agent_id, count + 3)
    assert rec["operational_state"] == records.GET_QUOTE
    assert rv.verifier.monitors is not None and rv.verifier.monitors.running == {a.agent_id}
    await rv.stop()
    await a.run.stop()
