"""The verifier's push model (API v3.0) end to end: a real Verifier actor (SQLite, HTTPS), software
push agents (real AK crypto, TPMS_ATTEST quotes and certifies built in software, an IMA list really
replayed into PCR 10), time on trio's MockClock (the agents' deadlines are mock seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.verifier import records
from keytrio.protocol import ima
from tests.actors.verifier.push_support import SoftAgent, entry, policy_for, push_enrol_body
from tests.actors.verifier_support import RunningVerifier, start_verifier

A = "a0000000-0000-4000-8000-00000000000a"
B = "b0000000-0000-4000-8000-00000000000b"
PATHS = ["/usr/bin/ls", "/usr/bin/cat", "/usr/lib/libc.so.6"]
GUARD = 60  # mock seconds: a hang guard only


@pytest.fixture
def clock() -> MockClock:
    # jumps only after 0.3 s of real idleness: sockets and SQLite threads finish first
    return MockClock(autojump_threshold=0.3)


async def start(nursery: trio.Nursery, tmp: Path, pki: Any, clock: MockClock, **over: Any) -> RunningVerifier:
    opts: dict[str, Any] = {"mode": "push", "quote_interval": 2.0}
    opts.update(over)
    return await start_verifier(nursery, pki, tmp / "verifier", clock=clock.current_time, **opts)


def agent(rv: RunningVerifier, pki: Any, agent_id: str = A, kind: str = "rsa", paths: list[str] = PATHS) -> SoftAgent:
    host, port = rv.verifier.address  # type: ignore[misc]
    return SoftAgent.make(agent_id, kind, host, port, pki.ca, paths)


async def enrolled(rv: RunningVerifier, pki: Any, agent_id: str = A, kind: str = "rsa") -> SoftAgent:
    await rv.call("POST", f"/agents/{agent_id}", push_enrol_body(kind, policy_for(PATHS)))
    a = agent(rv, pki, agent_id, kind)
    resp = await a.open_session()
    assert resp.status_code == 200 and a.token, resp.text
    return a


async def verdict(rv: RunningVerifier, agent_id: str, index: int) -> dict[str, Any]:
    """Poll the admin GET until the attestation's verification completed."""
    with trio.fail_after(GUARD):
        while True:
            resp = await rv.admin.get(rv.url.replace("/v2.1", "/v3") + f"/agents/{agent_id}/attestations/{index}")
            assert resp.status_code == 200, resp.text
            attrs = resp.json()["data"]["attributes"]
            if attrs["stage"] == "verification_complete":
                return resp.json()["data"]
            await trio.sleep(0.2)


async def wait_next(clock: MockClock, resp: Any) -> None:
    await trio.sleep(resp.json()["meta"]["seconds_to_next_attestation"])


async def test_happy_path_pass_then_more_lines_and_the_v2_record(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock, attestation_history=2)
    a = await enrolled(rv, pki)
    rec = await rv.get(A)
    assert rec is not None and rec["ip"] is None and rec["port"] is None

    index, resp = await a.cycle()
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert index == 0 and body["data"]["attributes"]["stage"] == "evaluating_evidence"
    assert body["data"]["id"] == "0" and body["meta"]["seconds_to_next_attestation"] == 2
    done = await verdict(rv, A, 0)
    assert done["attributes"]["evaluation"] == "pass", done
    assert done["attributes"]["failure_reason"] is None
    assert done["attributes"]["verification_completed_at"] is not None
    assert done["links"]["self"] == f"/v3/agents/{A}/attestations/0"

    # the next cycles ask only for the new lines (the IMA offset is the verified count)
    for n, path in enumerate(["/usr/bin/cat", "/usr/bin/ls"], start=1):
        await wait_next(clock, resp)
        a.entries.append(entry(path))
        caps = await a.post_capabilities()
        assert caps.status_code == 201, caps.text
        requested = caps.json()["data"]["attributes"]["evidence_requested"]
        assert requested[1]["chosen_parameters"]["starting_offset"] == len(a.entries) - 1
        assert requested[0]["chosen_parameters"]["selected_subjects"] == {"sha256": [10]}
        resp = await a.send_evidence(a.evidence(requested))
        assert resp.status_code == 202, resp.text
        assert (await verdict(rv, A, n))["attributes"]["evaluation"] == "pass"

    rec = await rv.get(A)
    assert rec is not None and rec["attestation_count"] == 3 and rec["operational_state"] == records.GET_QUOTE
    v25 = (await rv.admin.get(rv.url.replace("v2.1", "v2.5") + f"/agents/{A}")).json()["results"]
    assert v25["attestation_status"] == "PASS"
    # the history is bounded (attestation_history = 2), newest first; the agent may read its own
    listed = await a.request("GET", f"/agents/{A}/attestations")
    assert listed.status_code == 200, listed.text
    assert [d["id"] for d in listed.json()["data"]] == ["2", "1"]
    a.prefix = "/v3.0"  # both prefixes are served
    latest = await a.request("GET", f"/agents/{A}/attestations/latest")
    assert latest.status_code == 200 and latest.json()["data"]["id"] == "2"
    assert latest.json()["data"]["links"]["self"] == f"/v3.0/agents/{A}/attestations/2"
    await rv.stop()


async def test_tampered_ima_fails_policy_violation_with_notice_then_403(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    _, resp = await a.cycle()
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    await wait_next(clock, resp)
    a.entries.append(entry("/tmp/evil"))  # measured for real, not in the policy
    index, resp = await a.cycle()
    assert resp.status_code == 202, resp.text
    done = await verdict(rv, A, index)
    assert done["attributes"]["evaluation"] == "fail"
    assert done["attributes"]["failure_reason"] == "policy_violation"
    await rv.wait_state(A, records.INVALID_QUOTE)
    v25 = (await rv.admin.get(rv.url.replace("v2.1", "v2.5") + f"/agents/{A}")).json()["results"]
    assert v25["attestation_status"] == "FAIL"
    notices = await rv.notices(A)
    assert len(notices) == 1 and notices[0].event_id.startswith("ima."), notices
    await wait_next(clock, resp)
    again = await a.post_capabilities()
    assert again.status_code == 403 and "reactivate" in again.json()["errors"][0]["detail"]
    await rv.stop()


async def test_log_not_matching_pcr10_and_forged_signature_break_the_chain(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    b = await enrolled(rv, pki, B, "rsa2")
    # A: the log sent is not the one extended into PCR 10 (a line's digest replaced)
    lines = [ima.format_line(e) for e in a.entries]
    lines[1] = lines[1].replace(a.entries[1].digest.hex(), a.entries[0].digest.hex())
    _, resp = await a.cycle(lines=lines)
    assert resp.status_code == 202
    done = await verdict(rv, A, 0)
    assert (done["attributes"]["evaluation"], done["attributes"]["failure_reason"]) == ("fail",
                                                                                        "broken_evidence_chain")
    # B: one bit of the quote's RSA signature flipped (upstream 7.14.3 passes this)
    _, resp = await b.cycle(forge=True)
    assert resp.status_code == 202
    done = await verdict(rv, B, 0)
    assert (done["attributes"]["evaluation"], done["attributes"]["failure_reason"]) == ("fail",
                                                                                        "broken_evidence_chain")
    rec = await rv.wait_state(B, records.INVALID_QUOTE)
    assert rec["last_event_id"] == "qoute_validation.quote_validation"
    await rv.stop()


async def test_documented_subject_data_object_is_accepted(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    """The docs' ``{"<pcr>": "<hex>"}`` subject_data (upstream answers 500) verifies like the blob."""
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    _, resp = await a.cycle(as_object=True)
    assert resp.status_code == 202, resp.text
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    await rv.stop()


async def test_replayed_evidence_with_an_old_challenge_fails(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    caps = await a.post_capabilities()
    old = a.evidence(caps.json()["data"]["attributes"]["evidence_requested"])
    resp = await a.send_evidence(old)
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    await wait_next(clock, resp)
    caps = await a.post_capabilities()
    assert caps.status_code == 201
    resp = await a.send_evidence(old)  # a recording of the previous cycle
    assert resp.status_code == 202, resp.text
    done = await verdict(rv, A, 1)
    assert (done["attributes"]["evaluation"], done["attributes"]["failure_reason"]) == ("fail",
                                                                                        "broken_evidence_chain")
    await rv.stop()
