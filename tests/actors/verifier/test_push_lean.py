"""The push cycle's two requests on serve.py's lean HTTP path (no hypercorn stream, no quart).

Every request is sent twice: as is (small and whole: the lean path answers it, which a wrapper
around ``_Connection._serve_fast`` records) and with a query string, which the lean path never
takes (hypercorn -> BodyLimit -> FastRoutes -> FastCycle, the way it went before). Both must give
the same status, the same JSON:API document and the same headers that matter (Location,
Retry-After), and a refusal stores nothing on either. Real verifier, TLS, SQLite; MockClock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.common import serve
from keytrio.actors.common.app import FastRoutes
from keytrio.actors.verifier.push.fast import FastCycle
from tests.actors.verifier.push_support import JSONAPI, A, enrolled, rows, start, verdict


@pytest.fixture
def lean_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(method, path) of every request the lean path answered."""
    seen: list[tuple[str, str]] = []
    original = serve._Connection._serve_fast

    async def spy(self: Any, data_all: bytes, route_path: str) -> bool:
        seen.append((data_all.split(b" ", 1)[0].decode(), route_path))
        return await original(self, data_all, route_path)

    monkeypatch.setattr(serve._Connection, "_serve_fast", spy)
    return seen


@pytest.fixture
def direct_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(method, path) of every request serve.py handed to FastCycle.answer (no ASGI messages).
    While the list's first item is ``("off", "")`` (put there by the test) FastRoutes.direct
    answers None: the lean path then calls the layers as before (scope, receive, send)."""
    seen: list[tuple[str, str]] = []
    original = FastCycle.answer
    original_direct = FastRoutes.direct

    def direct(self: Any, method: str, path: str) -> Any:
        return None if seen[:1] == [("off", "")] else original_direct(self, method, path)

    monkeypatch.setattr(FastRoutes, "direct", direct)

    async def spy(self: Any, method: str, path: str, headers: Any, body: bytes) -> Any:
        seen.append((method, path))
        return await original(self, method, path, headers, body)

    monkeypatch.setattr(FastCycle, "answer", spy)
    return seen


def _wire(resp: Any) -> tuple[Any, ...]:
    """What the client got, as on the wire: status line, header lines in order (the Date aside:
    the second may turn between two answers), body bytes."""
    return (resp.http_version, resp.status_code, resp.reason_phrase,
            [(k, v) for k, v in resp.headers.raw if k.lower() != b"date"],
            [k for k, _ in resp.headers.raw], resp.content)


async def _direct_and_asgi(a: Any, direct_log: list[tuple[str, str]], method: str, path: str, body: Any,
                           headers: dict[str, str] | None) -> Any:
    """The request sent on the lean path twice, FastCycle called directly and through the ASGI
    layers (as before): the same bytes on the wire (a refusal or repeat changes nothing stored)."""
    count = len(direct_log)
    direct = await a.request(method, path, body, headers=headers)
    assert len(direct_log) == count + 1
    direct_log.insert(0, ("off", ""))
    try:
        asgi = await a.request(method, path, body, headers=headers)
    finally:
        direct_log.pop(0)
    assert len(direct_log) == count + 1  # the second one did not go to answer()
    assert _wire(direct) == _wire(asgi), (method, path)
    return direct


def _same(lean: Any, plain: Any) -> None:
    assert lean.status_code == plain.status_code, (lean.status_code, plain.status_code, lean.text, plain.text)
    assert lean.json() == plain.json(), (lean.text, plain.text)
    for name in ("content-type", "retry-after"):
        assert lean.headers.get(name) == plain.headers.get(name), name
    # the same header lines in the same order as quart's answer through hypercorn
    assert [k for k, _ in lean.headers.raw] == [k for k, _ in plain.headers.raw]


async def test_cycle_requests_answer_the_same_on_the_lean_path(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, lean_log: list[tuple[str, str]],
    direct_log: list[tuple[str, str]],
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await enrolled(rv, pki)
    caps = a.capabilities()
    token = {"Content-Type": JSONAPI, "Authorization": f"Bearer {a.token}"}
    cases: list[tuple[str, str, Any, dict[str, str] | None, int]] = [
        ("POST", f"/agents/{A}/attestations", b"[1,2", None, 400),  # malformed JSON
        ("POST", f"/agents/{A}/attestations", caps, {**token, "Content-Type": "application/xml"}, 400),
        ("POST", f"/agents/{A}/attestations", caps, {"Content-Type": JSONAPI}, 403),  # no token
        ("POST", f"/agents/{A}/attestations", caps, {**token, "Authorization": "Bearer x.y"}, 401),
        ("POST", "/agents/other-agent/attestations", caps, None, 403),  # another agent's id
        ("POST", f"/agents/{A}/attestations", {"data": {"type": "attestation"}}, None, 400),
        ("PATCH", f"/agents/{A}/attestations/latest", a.evidence([]), None, 404),  # nothing to answer yet
        ("PATCH", f"/agents/{A}/attestations/x1", a.evidence([]), None, 404),
        ("PATCH", f"/agents/{A}/attestations/latest", b"{", {**token, "Authorization": "Bearer x.y"}, 401),
    ]
    before = await rows(rv)
    for method, path, body, headers, status in cases:
        lean = await _direct_and_asgi(a, direct_log, method, path, body, headers)
        assert lean_log and lean_log[-1] == (method, "/v3" + path), (method, path, lean_log[-1:])
        count = len(lean_log)
        plain = await a.request(method, path + "?via=hypercorn", body, headers=headers)
        assert len(lean_log) == count  # the query string kept it off the lean path
        assert lean.status_code == status, (method, path, lean.text)
        _same(lean, plain)
    assert await rows(rv) == before  # no refusal stored anything, on either path

    # a whole cycle on the lean path: 201 with Location, 202, the evidence passes
    resp = await a.post_capabilities()
    assert resp.status_code == 201 and resp.headers["Location"] == f"/v3/agents/{A}/attestations/0", resp.text
    # the header lines in hypercorn's order (what h11 writes for quart's answer; json_head is
    # shared by the lean path's two ways, so only a fixed list can see a change there)
    assert [k for k, _ in resp.headers.raw] == [b"content-type", b"content-length", b"location", b"date"]
    requested = resp.json()["data"]["attributes"]["evidence_requested"]
    good = a.evidence(requested)
    resp = await a.send_evidence(good)
    assert resp.status_code == 202 and resp.headers["Location"].endswith("/attestations/0"), resp.text
    assert lean_log[-2:] == [("POST", f"/v3/agents/{A}/attestations"), ("PATCH", f"/v3/agents/{A}/attestations/latest")]
    assert direct_log[-2:] == lean_log[-2:]  # the whole cycle straight to FastCycle.answer
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    # evidence sent twice: 403 evidence_immutable on both paths, nothing changed
    before = await rows(rv)
    immutable = await _direct_and_asgi(a, direct_log, "PATCH", f"/agents/{A}/attestations/0", good, None)
    _same(immutable, await a.send_evidence(good, which="0?via=hypercorn"))
    # too early for the next one: 429 with Retry-After on both paths
    lean = await a.post_capabilities()
    plain = await a.request("POST", f"/agents/{A}/attestations?via=hypercorn", caps)
    assert lean.status_code == plain.status_code == 429
    # the seconds left (the mock clock may jump between the two while the test idles)
    assert 1 <= int(plain.headers["Retry-After"]) <= int(lean.headers["Retry-After"]) <= 2
    assert json.loads(lean.text)["errors"][0]["code"] == "premature_attestation"
    assert await rows(rv) == before
    await rv.stop()
