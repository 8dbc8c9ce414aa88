"""ASGI middleware that bounds request bodies: :class:`BodyLimit` answers a body over its route's
limit with a real 413 in the JSON envelope, after draining the upload so that the client reads the
answer instead of a reset (hypercorn closes a connection whose request body is unread).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from keytrio.protocol.envelope import error as error_envelope

DEFAULT_MAX_UPLOAD_SIZE = 1 << 20
DEFAULT_DRAIN_LIMIT = 16 << 20
DEFAULT_BODY_TIMEOUT = 30.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: bodies over ``max_size`` get a 413 in the JSON envelope.

    A body declared too large by Content-Length is rejected before the app sees the request; a
    chunked body is buffered up to ``max_size`` and rejected as soon as it exceeds it. Either way
    the rest of the upload is read and discarded (up to ``drain_limit`` bytes) before answering,
    because hypercorn closes a connection whose request body is unread and the client would see a
    reset instead of the 413. Beyond ``drain_limit`` we answer at once with ``Connection: close``.
    A body that stalls for ``body_timeout`` seconds gets a 408.
    ``limit_for(scope)``, when given, returns the (limit, option name) of the route asked for: the
    413 then names the option that raises it.

    The app receives the body in one ``http.request`` message.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_size: int = DEFAULT_MAX_UPLOAD_SIZE,
        drain_limit: int = DEFAULT_DRAIN_LIMIT,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        limit_for: Callable[[Scope], tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.max_size = max_size
        self.limit_for = limit_for
        self.drain_limit = drain_limit
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        limit, option = self.limit_for(scope) if self.limit_for is not None else (self.max_size, "")
        declared = _content_length(scope.get("headers", []))
        if declared is not None and declared > limit:
            await self._reject(receive, send, more=True, drained=0, declared=declared, limit=limit, option=option)
            return
        chunks: list[bytes] = []
        total = 0
        more = True
        with trio.move_on_after(self.body_timeout) as body_scope:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left; nobody to answer
                body = message.get("body", b"")
                total += len(body)
                more = bool(message.get("more_body", False))
                if total > limit:
                    await self._reject(receive, send, more=more, drained=total, declared=None, limit=limit,
                                       option=option)
                    return
                chunks.append(body)
        if body_scope.cancelled_caught:
            await _send_envelope(send, 408, "Request body not received in time", close=True)
            return
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()  # one copy of the body from here on
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        del body

        async def replay_receive() -> dict[str, Any]:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replay_receive, send)

    async def _reject(
        self, receive: Receive, send: Send, *, more: bool, drained: int, declared: int | None, limit: int,
        option: str,
    ) -> None:
        close = declared is not None and declared > self.drain_limit
        if not close:
            with trio.move_on_after(self.body_timeout):
                while more and drained <= self.drain_limit:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    drained += len(message.get("body", b""))
                    more = bool(message.get("more_body", False))
            close = more
        hint = f" (raise it with the option {option})" if option else ""
        await _send_envelope(send, 413, f"Request body larger than the limit of {limit} bytes{hint}", close=close)


async def _send_envelope(send: Send, code: int, status: str, *, close: bool) -> None:
    body = json.dumps(error_envelope(code, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _content_length(headers: Any) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 already rejects a malformed Content-Length with 400
    return None
