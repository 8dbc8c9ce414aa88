"""The verifier's push model (API v3.0) end to end: a real Verifier actor (SQLite, HTTPS), software
push agents (real AK crypto, TPMS_ATTEST quotes and certifies built in software, an IMA list really
replayed into PCR 10), time on trio's MockClock (the agents' deadlines are mock seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from trio.testing import MockClock

from keytrio.actors.verifier import records
from keytrio.protocol import ima
from tests.actors.verifier.push_support import (
    A,
    B,
    enrolled,
    entry,
    start,
    verdict,
    wait_next,
)


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
    # a steady-state cycle (three IMA lines) is checked before the 202: the answer is the verdict
    assert index == 0 and body["data"]["attributes"]["stage"] == "verification_complete"
    assert body["data"]["attributes"]["evaluation"] == "pass"
    assert body["data"]["id"] == "0" and body["meta"]["seconds_to_next_attestation"] == 2
    done = await verdict(rv, A, 0)
    assert done == body["data"]  # the 202 shows the attestation as stored
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
