"""What the tests of serve.py's lean path share: an app with one fast route that echoes what it
was given (and hypercorn's way to the same route), a request for it, and a reader of one answer."""

from __future__ import annotations

from typing import Any

import trio

from keytrio.actors.common.app import send_json

#: a request in the lean shape (the push cycle's PATCH): the base of the lean head's tests
GOOD = (b"PATCH /v3/agents/a1/attestations/latest HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8881\r\n"
        b"Authorization: Bearer abc.def\r\n"
        b"Content-Type: application/vnd.api+json\r\n"
        b"Content-Length: 11\r\n"
        b"\r\n"
        b'{"data": 1}')


class _Fast:
    """A fast route for /v1/echo: answers with the body and the headers it was given."""

    routes = {"/v1/echo": True}

    def lean_limit(self, method: str, path: str) -> int | None:
        return 1024 if path == "/v1/echo" else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:  # hypercorn's way may hand the body over in parts
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send_json(send, 200, {"body": body.decode(),
                                    "headers": sorted([k.decode(), v.decode()] for k, v in scope["headers"]
                                                      if k != b"x-obs")},
                        [(b"x-route", b"fast")])


class _App:
    """The app behind: lifespan, /v1/echo through hypercorn to the same route (as common.app's
    FastRoutes sits in the real app's chain), anything else 200 "slow"."""

    def __init__(self) -> None:
        self.fast_routes = _Fast()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/v1/echo":
            await self.fast_routes(scope, receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        await send_json(send, 200, {"slow": True})


async def read_answer(stream: trio.SocketStream, buf: bytearray) -> tuple[bytes, bytes] | None:
    """One response (head, body) from ``stream``; None at end of stream."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(buf) < end + 4 + length:
        chunk = await stream.receive_some(65536)
        assert chunk
        buf += chunk
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return head, body


def echo(body: bytes = b'{"n": 1}', extra: bytes = b"") -> bytes:
    return (b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)
