"""Push model (v3.0) refusals: PoP, tokens, the cycle's 429/503/403 rules, bad input on every
route (a 4xx JSON:API error and nothing stored). Real Verifier actor, software agents, MockClock."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import trio
from trio.testing import MockClock

from keytrio.actors.verifier.schema import push_sessions
from tests.actors.verifier.push_support import (
    JSONAPI,
    A,
    B,
    SoftAgent,
    agent,
    enrolled,
    entry,
    rows,
    start,
    verdict,
)


def error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["errors"][0]
    assert err["status"] == str(status) and err["title"] and err["detail"], err
    return err


async def test_pop_and_tokens(nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    # not enrolled yet: 200 with evaluation "fail" (the agent retries), no token
    early = agent(rv, pki)
    resp = await early.open_session()
    assert resp.status_code == 200 and resp.json()["data"]["attributes"]["evaluation"] == "fail"
    assert "token" not in resp.json()["data"]["attributes"] and early.token is None
    a = await enrolled(rv, pki)
    b = await enrolled(rv, pki, B, "rsa2")
    # another agent's AK cannot prove A's possession: 401
    thief = agent(rv, pki, A, "rsa2")
    resp = await thief.open_session()
    assert resp.status_code == 401 and resp.json()["data"]["attributes"]["evaluation"] == "fail"
    assert thief.token is None
    # tokens are stored hashed
    stored = await rv.verifier.store.read(lambda c: list(c.execute(sa.select(push_sessions.c.token_hash)).scalars()))
    assert a.token not in stored and all(t is None or len(t) == 64 for t in stored)

    path = f"/agents/{A}/attestations"
    err = error(await a.post_capabilities(token=""), 403)  # no token: the "authenticate" signal
    assert "requires agent authentication" in err["detail"]
    error(await a.post_capabilities(token="not-a-token"), 401)
    error(await a.post_capabilities(token=f"{uuid.uuid4()}.{'x' * 43}"), 401)  # unknown session
    error(await a.post_capabilities(token=b.token), 403)  # B's token on A
    error(await a.request("GET", path, token=b.token), 403)
    error(await a.request("PATCH", path + "/latest", a.evidence([]), token=b.token), 403)
    error(await a.request("GET", path, headers={}), 403)  # neither admin cert nor token
    assert (await a.request("GET", path)).status_code == 200  # its own token
    admin = await rv.admin.get(rv.url.replace("/v2.1", "/v3") + path)
    assert admin.status_code == 200 and admin.json()["data"] == []

    # POST /sessions is public: unanswered challenges are bounded (429 + Retry-After), and an
    # agent keeps only its newest sessions
    rv.verifier.push.sessions.max_pending = 3  # type: ignore[union-attr]
    made_up = [agent(rv, pki, str(uuid.uuid4())) for _ in range(4)]
    body = lambda x: {"data": {"type": "session", "attributes": {  # noqa: E731
        "agent_id": x.agent_id, "authentication_supported": [
            {"authentication_class": "pop", "authentication_type": "tpm_pop"}]}}}
    codes = [(await x.request("POST", "/sessions", body(x), token="")).status_code for x in made_up]
    assert codes == [200, 200, 200, 429]  # every earlier session was answered: none counts
    flood = await made_up[0].request("POST", "/sessions", body(made_up[0]), token="")
    error(flood, 429)
    assert int(flood.headers["Retry-After"]) == 60
    await trio.sleep(61)  # the challenges expire: room again
    assert (await made_up[0].request("POST", "/sessions", body(made_up[0]), token="")).status_code == 200
    await rv.stop()


async def test_cycle_rules_429_403_503(nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock) -> None:
    rv = await start(nursery, tmp_path, pki, clock, quote_interval=30.0)
    a = await enrolled(rv, pki)
    caps = await a.post_capabilities()
    requested = caps.json()["data"]["attributes"]["evidence_requested"]
    body = a.evidence(requested)
    # a new POST before any evidence: a fresh attestation replaces the awaiting one
    caps = await a.post_capabilities()
    assert caps.status_code == 201 and caps.headers["Location"].endswith("/attestations/1")
    err = error(await a.send_evidence(body, which="0"), 403)  # not the latest
    assert "latest" in err["detail"]
    requested = caps.json()["data"]["attributes"]["evidence_requested"]
    resp = await a.send_evidence(a.evidence(requested), which="1")
    assert resp.status_code == 202, resp.text
    assert resp.json()["meta"]["seconds_to_next_attestation"] == 30
    err = error(await a.send_evidence(a.evidence(requested)), 403)
    assert err["code"] == "evidence_immutable"
    await verdict(rv, A, 1)
    premature = await a.post_capabilities()
    err = error(premature, 429)
    assert err["code"] == "premature_attestation" and 1 <= int(premature.headers["Retry-After"]) <= 30
    await trio.sleep(30)
    # 503 while the previous evidence is still being verified (its verification held back here;
    # large evidence, so verified after the 202: a steady-state cycle is checked before it)
    a.entries += [entry("/usr/bin/ls")] * 80
    limiter = rv.verifier.push.verifier.limiter  # type: ignore[union-attr]
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for h in holders:
        await limiter.acquire_on_behalf_of(h)
    caps = await a.post_capabilities()
    resp = await a.send_evidence(a.evidence(caps.json()["data"]["attributes"]["evidence_requested"]))
    assert resp.status_code == 202
    await trio.sleep(30)
    busy = await a.post_capabilities()
    error(busy, 503)
    assert busy.headers["Retry-After"] == "1"
    for h in holders:
        limiter.release_on_behalf_of(h)
    assert (await verdict(rv, A, 2))["attributes"]["evaluation"] == "pass"
    assert (await a.post_capabilities()).status_code == 201
    await rv.stop()


async def test_bad_input_is_a_jsonapi_4xx_and_stores_nothing(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    caps_ok = a.capabilities()
    before = await rows(rv)

    def caps(mutate: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(caps_ok))
        mutate(doc["data"]["attributes"])
        return doc

    quote_caps = lambda d: d["evidence_supported"][0]["capabilities"]  # noqa: E731
    sid = str(uuid.uuid4())
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/sessions", b"{not json", 400),
        ("POST", "/sessions", [], 400),
        ("POST", "/sessions", {"data": {"type": "session", "attributes": {"agent_id": "../x"}}}, 400),
        ("POST", "/sessions", {"data": {"type": "attestation", "attributes": {}}}, 400),
        ("POST", "/sessions", {"data": {"type": "session", "attributes": {
            "agent_id": A, "authentication_supported": [{"authentication_class": "password"}]}}}, 422),
        ("PATCH", f"/sessions/{sid}", {"data": {"type": "session", "attributes": {"agent_id": A,
            "authentication_provided": [{"authentication_class": "pop", "authentication_type": "tpm_pop",
                                         "data": {"message": "AA==", "signature": "AA=="}}]}}}, 404),
        ("PATCH", "/sessions/x", {}, 404),
        ("PATCH", f"/sessions/{sid}", {"data": {"type": "session", "attributes": {"agent_id": A,
            "authentication_provided": [{"authentication_class": "pop", "authentication_type": "tpm_pop",
                                         "data": {"message": "%%%", "signature": "AA=="}}]}}}, 400),
        ("POST", f"/agents/{A}/attestations", b"[1,2", 400),
        ("POST", f"/agents/{A}/attestations", {"data": {"type": "attestation"}}, 400),
        ("POST", f"/agents/{A}/attestations", caps(lambda d: d.update(evidence_supported=[])), 400),
        ("POST", f"/agents/{A}/attestations", caps(lambda d: d["evidence_supported"].pop(0)), 422),
        ("POST", f"/agents/{A}/attestations", caps(lambda d: quote_caps(d).update(hash_algorithms=["md5"])), 422),
        ("POST", f"/agents/{A}/attestations",
         caps(lambda d: quote_caps(d).update(available_subjects={"sha256": [0, 99]})), 422),
        ("POST", f"/agents/{A}/attestations",
         caps(lambda d: quote_caps(d).update(available_subjects={"sha256": [0, 1]})), 422),  # no PCR 10
        ("POST", f"/agents/{A}/attestations", caps(lambda d: d["evidence_supported"].pop(1)), 422),  # no ima_log
        ("POST", f"/agents/{A}/attestations", caps(lambda d: d.update(system_info=[])), 400),
        ("POST", "/agents/bad%20id/attestations", caps_ok, 400),
        ("PATCH", f"/agents/{A}/attestations/latest", a.evidence([]), 404),  # no attestation yet
        ("GET", f"/agents/{A}/attestations/x1", None, 404),
        ("DELETE", f"/agents/{A}/attestations", None, 403),  # unrouted: auth first, as the app does
        ("GET", "/nothing/here", None, 403),  # no route: the app's refusal, in the v3 format
    ]
    for method, path, body, status in cases:
        resp = await a.request(method, path, body)
        error(resp, status)
    assert await rows(rv) == before

    # evidence: one good attestation awaiting, then broken evidence bodies against it
    caps_resp = await a.post_capabilities()
    requested = caps_resp.json()["data"]["attributes"]["evidence_requested"]
    good = a.evidence(requested)
    before = await rows(rv)

    def ev(mutate: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        mutate(doc["data"]["attributes"]["evidence_collected"])
        return doc

    bad_evidence: list[tuple[Any, int]] = [
        (ev(lambda items: items.pop()), 422),  # fewer items than requested
        (ev(lambda items: items.reverse()), 422),  # not in the requested order
        (ev(lambda items: items[0]["data"].update(message="not base64!")), 400),
        (ev(lambda items: items[0]["data"].update(subject_data="AAAA")), 422),  # not a PCR blob
        (ev(lambda items: items[0]["data"].update(subject_data={"99": "00"})), 422),
        (ev(lambda items: items[0]["data"].update(subject_data=7)), 400),
        (ev(lambda items: items[1]["data"].update(entries=5)), 400),
        (ev(lambda items: items[1]["data"].update(entry_count=99)), 422),
        (ev(lambda items: items.__setitem__(0, "x")), 400),
        ({"data": {"type": "session", "attributes": {}}}, 400),
    ]
    for body, status in bad_evidence:
        error(await a.send_evidence(body), status)
    assert await rows(rv) == before
    # the media type is checked, and the attestation still takes the good evidence
    resp = await a.send_evidence(good, headers={"Content-Type": "application/xml",
                                                "Authorization": f"Bearer {a.token}"})
    error(resp, 400)
    resp = await a.send_evidence(good, headers={"Content-Type": JSONAPI, "Authorization": f"Bearer {a.token}"})
    assert resp.status_code == 202, resp.text
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    await rv.stop()


async def test_pull_mode_refuses_push_enrolment_and_serves_no_v3(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    from tests.actors.verifier.push_support import push_enrol_body

    rv = await start(nursery, tmp_path, pki, clock, mode="pull")
    await rv.call("POST", f"/agents/{A}", push_enrol_body("rsa"), code=400)
    resp = await rv.admin.post(rv.url.replace("/v2.1", "/v3") + "/sessions", json={})
    assert resp.status_code in (400, 404)
    a: SoftAgent = agent(rv, pki)
    assert (await a.request("POST", "/sessions", {})).status_code == 403  # no route, no client cert
    await rv.stop()


async def test_mode_both_routes_each_agent_to_its_kind(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    from tests.actors.verifier.push_support import push_enrol_body

    rv = await start(nursery, tmp_path, pki, clock, mode="both", quote_interval=30.0)
    await enrolled(rv, pki)  # cloudagent_ip/port null: a push agent
    await rv.call("POST", f"/agents/{B}", push_enrol_body(
        "rsa2", None, cloudagent_ip="127.0.0.1", cloudagent_port=9, mtls_cert=pki.agent.pem))
    monitors, push = rv.verifier.monitors, rv.verifier.push
    assert monitors is not None and push is not None
    assert A not in monitors.running and push.deadlines.deadline(A) is not None
    assert B in monitors.running and push.deadlines.deadline(B) is None
    pull_agent = agent(rv, pki, B, "rsa2")
    assert (await pull_agent.open_session()).status_code == 200  # its AK proves it ...
    err = error(await pull_agent.post_capabilities(), 403)  # ... but it is attested by polling
    assert "pull-mode" in err["detail"]
    await rv.stop()
