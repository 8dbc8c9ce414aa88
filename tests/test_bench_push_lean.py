"""bench.sim_push.LeanConn, the simulated push agents' own HTTP client, against a scripted server
on a real socket (plain HTTP): the request it writes, a kept connection reused, one closed by the
server while idle retried once on a new one, answers it cannot frame refused. Not timed (the
fail_after is a hang guard)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from bench.sim_push import LeanConn, LeanError

GUARD = 20.0


async def _serve(nursery: trio.Nursery, script: Callable[[int, bytes], bytes | None]) -> tuple[str, list[bytes]]:
    """A server that reads one request at a time and writes ``script(connection no., request)``,
    closing the connection when it returns None; -> (base URL, every request seen)."""
    seen: list[bytes] = []
    conns = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal conns
        conns += 1
        no = conns
        buf = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += await stream.receive_some(65536)
                seen.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                answer = script(no, seen[-1])
                if answer is None:
                    return
                await stream.send_all(answer)

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}", seen


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_request_bytes_reuse_and_retry_after_an_idle_close() -> None:
    async with trio.open_nursery() as nursery:
        # connection 1 answers once and is closed by the server while idle; connection 2 answers
        base, seen = await _serve(nursery, lambda no, req: _ok(b'{"a": 1}') if no > 1 or len(seen) == 1 else None)
        conn = LeanConn(base, None)
        with trio.fail_after(GUARD):
            r = await conn.request("POST", "/v3/agents/x/attestations", b'{"b": 2}', "tok")
            assert (r.status_code, r.json()) == (201, {"a": 1})
            await trio.sleep(0.05)  # let the server see the next request on the same connection
            r = await conn.request("PATCH", "/v3/agents/x/attestations/latest", b"{}", None)
            assert r.status_code == 201
        conn.close()
        nursery.cancel_scope.cancel()
    head = seen[0].split(b"\r\n")
    assert head[0] == b"POST /v3/agents/x/attestations HTTP/1.1"
    assert b"Content-Type: application/vnd.api+json" in head and b"Authorization: Bearer tok" in head
    assert seen[0].endswith(b'\r\n\r\n{"b": 2}')
    # the second request went out twice: on the dead kept connection (no answer), then on a new one
    assert len(seen) == 3 and not any(b"Authorization" in line for line in seen[2].split(b"\r\n"))


async def test_kept_connection_reused_and_retry_after_header_read() -> None:
    conns: list[int] = []

    def script(no: int, req: bytes) -> bytes:
        conns.append(no)
        return _ok(b"{}", b"Retry-After: 7\r\n")

    async with trio.open_nursery() as nursery:
        base, _seen = await _serve(nursery, script)
        conn = LeanConn(base, None)
        with trio.fail_after(GUARD):
            for _ in range(3):
                r = await conn.request("POST", "/p", b"{}", None)
                assert r.headers.get("Retry-After") == "7"
        conn.close()
        nursery.cancel_scope.cancel()
    assert conns == [1, 1, 1]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n{}",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",  # cut short by the close below
])
async def test_answers_it_cannot_frame_are_errors(answer: bytes) -> None:
    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.receive_some(65536)
                await stream.send_all(answer)

        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        conn = LeanConn(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", None)
        with trio.fail_after(GUARD), pytest.raises(LeanError):
            await conn.request("POST", "/p", b"{}", None)
        assert conn.conn is None  # closed after a failure
        nursery.cancel_scope.cancel()
