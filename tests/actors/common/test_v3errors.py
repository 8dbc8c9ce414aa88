"""V3Errors at the ASGI layer: v3 error answers become JSON:API documents (whatever produced them,
in however many body chunks), successes and v2 paths pass untouched."""

from __future__ import annotations

import json
from typing import Any

from keytrio.actors.common.v3errors import V3Errors, is_v3_path


def _app(status: int, chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None):
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": headers or [(b"content-type", b"application/json"), (b"x-keep", b"1")]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

    return app


async def _call(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    await V3Errors(app)({"type": "http", "path": path, "method": "GET"}, receive, send)
    start, bodies = sent[0], sent[1:]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in bodies)


async def test_v3_errors_become_jsonapi_in_any_chunking():
    envelope = json.dumps({"code": 500, "status": "Internal Server Error", "results": {}}).encode()
    status, headers, body = await _call(_app(500, [envelope[:5], envelope[5:]]), "/v3.0/agents/")
    assert status == 500 and headers[b"x-keep"] == b"1"
    assert json.loads(body) == {"errors": [{"status": "500", "title": "Internal Server Error",
                                            "detail": "Internal Server Error"}]}
    assert headers[b"content-length"] == str(len(body)).encode()

    # a body that is not the envelope (or none at all) gets the reason phrase
    _, _, body = await _call(_app(404, [b"<html>"]), "/v3/x")
    assert json.loads(body)["errors"][0] == {"status": "404", "title": "Not Found", "detail": "Not Found"}

    # an answer that already is a JSON:API error document is kept as it is
    doc = json.dumps({"errors": [{"status": "403", "detail": "token"}]}).encode()
    assert (await _call(_app(403, [doc]), "/v3/sessions"))[2] == doc


async def test_successes_and_v2_paths_pass_untouched():
    ok = b'{"code": 200, "status": "Success", "results": {}}'
    assert await _call(_app(200, [ok]), "/v3.0/") == (200, {b"content-type": b"application/json", b"x-keep": b"1"}, ok)
    err = b'{"code": 400, "status": "Bad request: x", "results": {}}'
    assert (await _call(_app(400, [err]), "/v2.5/agents/x"))[2] == err
    assert [is_v3_path(p) for p in ("/v3", "/v3/", "/v3.0/agents", "/v30/x", "/v2.5/", "/version")] == [
        True, True, True, False, False, False]
