"""Hostile bodies on the push cycle's two routes, sent the way the lean HTTP path takes them.

tests/actors/common/test_fuzz.py fuzzes a pull-mode verifier's routes, and test_push_lean.py
compares a handful of refusals on both paths; neither sends hostile input with a VALID token to a
push verifier, where the body is decoded and parsed on serve.py's lean path (small, whole, no
query string) and reaches the cycle's own checks. Here every decoder-level hostile body of the
fuzz suite and every field of a good capabilities and evidence document replaced by each hostile
JSON value go to agent A's own routes with A's token: each must be answered on the lean path
(recorded), with a 4xx JSON:API error envelope (``status`` = the HTTP status as text, a detail),
and leave the verifier's database exactly as it was (every table, every row). A good cycle still
passes after that. Real verifier, TLS, SQLite; MockClock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.common import serve
from tests.actors import fuzz_support as fz
from tests.actors.verifier.push_support import A, enrolled, start, verdict


@pytest.fixture
def lean_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The method of every request serve.py's lean path answered."""
    seen: list[str] = []
    original = serve._Connection._serve_fast

    async def spy(self: Any, data_all: bytes, route_path: str) -> bool:
        seen.append(data_all.split(b" ", 1)[0].decode())
        return await original(self, data_all, route_path)

    monkeypatch.setattr(serve._Connection, "_serve_fast", spy)
    return seen


def hostile_bodies(good: dict[str, Any]) -> list[bytes]:
    """The fuzz corpus for one route (fuzz_support.corpus): hostile bodies, then ``good`` with each
    field in turn replaced by each hostile JSON value."""
    bodies = list(fz.HOSTILE_BODIES) + [t.encode() for t in fz.HOSTILE_JSON]
    for path in fz._fields(good):
        text = json.dumps(fz._replace(good, path, fz._MARK))
        bodies += [text.replace(json.dumps(fz._MARK), hostile, 1).encode() for hostile in fz.CORPUS_JSON]
    return bodies


def _refused(resp: Any, what: str) -> None:
    assert 400 <= resp.status_code < 500, (what, resp.status_code, resp.text[:300])
    doc = resp.json()
    errors = doc.get("errors")
    assert isinstance(errors, list) and errors, (what, doc)
    assert all(e.get("status") == str(resp.status_code) and e.get("detail") for e in errors), (what, doc)
    assert "Traceback" not in resp.text, what


async def test_hostile_bodies_with_a_valid_token_on_the_lean_path(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, lean_log: list[str]
) -> None:
    # long interval and session: ~230 requests let the autojumping MockClock jump to connection
    # timeouts now and then; the agent's deadline or its token must not run out meanwhile
    rv = await start(nursery, tmp_path, pki, clock, quote_interval=600.0, session_lifetime=86400.0)
    db = tmp_path / "verifier" / "verifier.sqlite"
    a = await enrolled(rv, pki)
    caps_path = f"/agents/{A}/attestations"

    async def each(method: str, path: str, bodies: list[bytes]) -> None:
        before = fz.sqlite_dump(db)
        small = 0
        for body in bodies:
            what = f"{method} {body[:80]!r}"
            count = len(lean_log)
            _refused(await a.request(method, path, body), what)
            # the lean path answers whole requests up to serve._FAST_MAX; a larger one (the
            # 5,000-deep nesting) goes through hypercorn, and must be refused the same way
            lean = len(body) + 1024 <= serve._FAST_MAX
            assert len(lean_log) == count + lean and (not lean or lean_log[-1] == method), what
            small += lean
        assert fz.sqlite_dump(db) == before, method  # nothing stored, nothing changed
        assert small >= len(bodies) // 2, (small, len(bodies))  # mostly the lean path

    await each("POST", caps_path, hostile_bodies(a.capabilities()))

    resp = await a.post_capabilities()  # a real attestation awaits its evidence now
    assert resp.status_code == 201, resp.text
    requested = resp.json()["data"]["attributes"]["evidence_requested"]
    good = a.evidence(requested)
    await each("PATCH", f"{caps_path}/latest", hostile_bodies(good))

    resp = await a.send_evidence(good)  # the attestation was left as it was: it still takes its evidence
    assert resp.status_code == 202, resp.text
    assert (await verdict(rv, A, 0))["attributes"]["evaluation"] == "pass"
    await rv.stop()
