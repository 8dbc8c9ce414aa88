"""ASGI middleware: error answers on API v3 paths become JSON:API error documents.

API v3.0 reports errors as ``{"errors": [{"status": "400", "title": "Bad Request", "detail":
...}]}`` while v2.x keeps ``{"code", "status", "results"}``. Errors come from many places (a
handler's ApiError, the client-cert check, routing's 404/405, bodylimit.BodyLimit's 413/408 before
the app reads anything, the 500 fallback), all rendered in the v2 envelope; this layer, outermost
around the app, rewrites those of a ``/v3...`` request in one place, so no error path can leak the
other shape. Successful answers pass untouched (v3.0 registrar successes keep the v2 envelope, as
upstream's v3.0 registrar document shows them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_V3_PATH = re.compile(r"^/v3(?:\.\d+)*(?:/|$)")


def is_v3_path(path: str) -> bool:
    return bool(_V3_PATH.match(path))


def error_document(code: int, detail: str) -> dict[str, Any]:
    """``{"errors": [{"status", "title", "detail"}]}`` (status as a string, as JSON:API has it)."""
    try:
        title = HTTPStatus(code).phrase
    except ValueError:
        title = "Error"
    return {"errors": [{"status": str(code), "title": title, "detail": detail}]}


def _detail(code: int, body: bytes) -> str:
    """The human text of a v2 envelope body (its ``status``), else the reason phrase."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("status"), str) and doc["status"]:
        return str(doc["status"])
    if isinstance(doc, dict) and (isinstance(doc.get("errors"), list) or isinstance(doc.get("data"), dict)):
        # already a JSON:API document (an error, or a resource such as a failed PoP session's 401)
        return ""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


class V3Errors:
    """Wrap an ASGI app: ``app.asgi_app = V3Errors(app.asgi_app)``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not is_v3_path(str(scope.get("path") or "")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_v3(message: Message) -> None:
            nonlocal start
            kind = message.get("type")
            if kind == "http.response.start" and int(message.get("status", 200)) >= 400:
                start = message  # held until the whole (small) error body is here
                return
            if kind == "http.response.body" and start is not None:
                chunks.append(bytes(message.get("body", b"")))
                if message.get("more_body", False):
                    return
                await self._send_error(send, start, b"".join(chunks))
                return
            await send(message)

        await self.app(scope, receive, send_v3)

    @staticmethod
    async def _send_error(send: Send, start: Message, body: bytes) -> None:
        code = int(start["status"])
        detail = _detail(code, body)
        out = body if detail == "" else json.dumps(error_document(code, detail)).encode()
        headers = [
            (name, value)
            for name, value in start.get("headers", [])
            if bytes(name).lower() not in (b"content-length", b"content-type")
        ]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": out, "more_body": False})
