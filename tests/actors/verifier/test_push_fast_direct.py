"""FastCycle called directly by serve.py's lean path (``FastRoutes.direct`` + ``FastCycle.answer``)
against the ASGI call it replaces (``FastRoutes(scope, receive, send)``, the two messages).

For every kind of answer a route gives (documents with and without Location / Retry-After, a
WireError with and without retry_after, an exception: the route's 500 and its log record, a
header value that cannot be encoded: the same exception out), every kind of body (good, bad JSON,
not an object, a lone surrogate on POST and on PATCH, the wrong media type, no Authorization),
the direct answer must be the same status, the same header list (names, values, order) and the
same body bytes as the ASGI messages, and the route must be called with the same arguments.
``direct`` must hand over only what FastCycle itself would answer with nothing in between.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from keytrio.actors.common.app import FastRoutes
from keytrio.actors.verifier.push.fast import FastCycle
from keytrio.protocol.push_wire import WireError

AGENT = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
CAPS = f"/v3/agents/{AGENT}/attestations"
EVID = f"/v3.0/agents/{AGENT}/attestations/latest"
JSONAPI = b"application/vnd.api+json"


class _Cycle:
    """Records each call and gives the answer (or raises what) ``outcome`` says."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[tuple[Any, ...]] = []

    async def _give(self, *args: Any) -> Any:
        self.calls.append(args)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    async def capabilities(self, prefix: str, agent_id: str, authorization: str | None, doc: object) -> Any:
        return await self._give("capabilities", prefix, agent_id, authorization, _plain(doc))

    async def evidence(self, prefix: str, agent_id: str, which: str, authorization: str | None,
                       doc: object) -> Any:
        return await self._give("evidence", prefix, agent_id, which, authorization, _plain(doc))


def _plain(doc: object) -> object:
    return ("WireError", doc.status, doc.detail, doc.code) if isinstance(doc, WireError) else doc


async def _quart(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not for quart")


def _layers(outcome: Any) -> tuple[FastRoutes, FastCycle]:
    routes = FastRoutes(_quart)
    fast = FastCycle(routes.app, _Cycle(outcome), (1 << 20, 1 << 20))
    routes.app = fast
    routes.lean.append(fast)
    return routes, fast


async def _via_asgi(routes: FastRoutes, method: str, path: str, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """What serve.py's lean path did before: the two ASGI messages of the layers' call."""
    answer: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        answer[message["type"]] = message

    await routes({"type": "http", "method": method, "path": path, "headers": headers}, receive, send)
    start = answer["http.response.start"]
    return start["status"], list(start["headers"]), answer["http.response.body"]["body"]


OUTCOMES: list[Any] = [
    (201, {"data": {"id": "3", "attributes": {"n": 1.5, "s": "é\u2028"}}}, {"Location": f"{CAPS}/3"}),
    (202, {"data": {"id": "0"}}, {"Location": f"{CAPS}/0"}),
    (429, {"errors": []}, {"Retry-After": "7"}),
    (200, {}, {}),
    (201, {"x": 1}, {"X-Two": "a", "location": "/b"}),
    WireError(403, "no", "bad_token"),
    WireError(429, "wait", "premature_attestation", retry_after=3),
    WireError(503, "busy", None, retry_after=0),
    RuntimeError("boom"),
]
BODIES: list[tuple[list[tuple[bytes, bytes]], bytes]] = [
    ([(b"host", b"h"), (b"content-type", JSONAPI), (b"authorization", b"Bearer a.b")], b'{"data": {"a": [1, 2]}}'),
    ([(b"host", b"h"), (b"content-type", b"application/json; charset=utf-8")], b'{"data": 1}'),
    ([(b"content-type", JSONAPI), (b"authorization", b"Bearer x"), (b"authorization", b"Bearer y")], b"[1,2"),
    ([(b"content-type", JSONAPI)], b"[1, 2]"),
    ([(b"content-type", JSONAPI)], b'{"s": "\\ud800"}'),
    ([(b"content-type", b"application/xml"), (b"authorization", b"Bearer a.b")], b"{}"),
    ([(b"authorization", b"Bearer caf\xe9")], b"{}"),
    ([], b""),
]


@pytest.mark.parametrize("outcome", OUTCOMES, ids=lambda o: type(o).__name__ + str(getattr(o, "status", "")))
@pytest.mark.parametrize(("method", "path"), [("POST", CAPS), ("PATCH", EVID), ("PATCH", CAPS + "/12")])
async def test_direct_answer_is_the_asgi_answer(outcome: Any, method: str, path: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    for headers, body in BODIES:
        routes, fast = _layers(outcome)
        assert routes.direct(method, path) is fast
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="keytrio.verifier"):
            want = await _via_asgi(routes, method, path, headers, body)
        want_log = [(r.levelno, r.getMessage(), r.exc_info[0] if r.exc_info else None) for r in caplog.records]
        want_calls = list(fast.cycle.calls)  # type: ignore[attr-defined]
        routes, fast = _layers(outcome)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="keytrio.verifier"):
            got = await routes.direct(method, path).answer(method, path, headers, body)  # type: ignore[union-attr]
        got_log = [(r.levelno, r.getMessage(), r.exc_info[0] if r.exc_info else None) for r in caplog.records]
        assert got == want, (headers, body)
        assert [type(x) for x in got[1][0]] == [bytes, bytes]
        assert fast.cycle.calls == want_calls  # type: ignore[attr-defined]
        assert got_log == want_log


async def test_an_unencodable_header_raises_the_same_on_both() -> None:
    outcome = (201, {}, {"Location": "/\u20ac"})
    with pytest.raises(UnicodeEncodeError):
        await _via_asgi(_layers(outcome)[0], "POST", CAPS, [(b"content-type", JSONAPI)], b"{}")
    routes, _ = _layers(outcome)
    with pytest.raises(UnicodeEncodeError):
        await routes.direct("POST", CAPS).answer("POST", CAPS, [(b"content-type", JSONAPI)], b"{}")  # type: ignore[union-attr]


def test_direct_only_for_what_fastcycle_answers_with_nothing_between() -> None:
    routes, fast = _layers((200, {}, {}))
    for method, path in [("GET", CAPS), ("PATCH", f"/v3/agents/{AGENT}/attestations"), ("POST", CAPS + "/1"),
                         ("POST", CAPS + "/"), ("POST", "/v2.5/agents/a/attestations"), ("POST", "/verify/evidence"),
                         ("PATCH", EVID + "/x")]:
        assert routes.direct(method, path) is None, (method, path)
        assert fast.lean_limit(method, path) is None
    assert routes.direct("POST", CAPS) is fast

    # a layer wrapped around FastCycle: the ASGI call, so that layer still sees the request
    async def between(scope: Any, receive: Any, send: Any) -> None:
        await fast(scope, receive, send)
    routes.app = between
    assert routes.direct("POST", CAPS) is None

    # a fast route of FastRoutes itself that takes the path: FastRoutes answers it, not FastCycle
    routes, fast = _layers((200, {}, {}))
    routes.routes[f"/agents/{AGENT}/attestations"] = type("R", (), {"versions": ("3", "3.0")})()  # type: ignore[assignment]
    assert routes.match({"type": "http", "method": "POST", "path": CAPS}) is not None
    assert routes.direct("POST", CAPS) is None
    assert routes.direct("PATCH", EVID) is fast

    # FastCycle not among the lean layers: not handed over either
    routes, fast = _layers((200, {}, {}))
    routes.lean.clear()
    assert routes.direct("POST", CAPS) is None
