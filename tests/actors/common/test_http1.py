"""The KeepAliveClient's HTTP/1.1 exchange (actors/common/http1.py) against a real TCP server that
answers canned bytes: framings it must read, and responses it must refuse."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from keytrio.actors.common.client import (
    CommunicationError,
    KeepAliveClient,
    MalformedResponse,
    ResponseTooLarge,
    request_json,
)

BODY = b'{"code": 200, "status": "Success", "results": {"n": 1}}'


async def canned(replies: list[bytes], seen: list[bytes], stream: trio.SocketStream) -> None:
    """Answer each request on this connection with the next canned reply (sent in small pieces)."""
    buf = b""
    for reply in replies:
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        seen.append(head)
        try:
            for i in range(0, len(reply), 7):
                await stream.send_all(reply[i:i + 7])
        except trio.BrokenResourceError:  # the client gave up on this reply (a cap): fine
            return
    await stream.aclose()


async def serve(nursery: trio.Nursery, replies: list[bytes]) -> tuple[str, list[bytes]]:
    seen: list[bytes] = []
    listeners = await nursery.start(partial(trio.serve_tcp, partial(canned, replies, seen), 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}", seen


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunked(body: bytes) -> bytes:
    mid = len(body) // 2
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-T: 1\r\n\r\n"
            % (mid, body[:mid], len(body) - mid, body[mid:]))


async def test_framings_and_reuse(nursery: trio.Nursery) -> None:
    replies = [ok(), b"HTTP/1.1 100 Continue\r\n\r\n" + chunked(BODY), ok(extra=b"Connection: close\r\n")]
    base, seen = await serve(nursery, replies)
    async with KeepAliveClient(None, timeout=5) as client:
        for _ in range(3):
            assert (await request_json(client, "GET", f"{base}/v2.1/x?a=1")).results == {"n": 1}
        assert len(seen) == 3  # one connection carried all three
        assert seen[0].startswith(b"GET /v2.1/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
        assert client._stream is None  # Connection: close was honoured
    base, seen = await serve(nursery, [b"HTTP/1.0 200 OK\r\n\r\n" + BODY])  # delimited by EOF
    async with KeepAliveClient(None, timeout=5) as client:
        assert (await request_json(client, "POST", f"{base}/p", {"a": 1})).results == {"n": 1}
    assert b"Content-Length: 8" in seen[0]


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + BODY,  # cut short by EOF
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n",
])
async def test_refused_responses(nursery: trio.Nursery, reply: bytes) -> None:
    base, _ = await serve(nursery, [reply])
    async with KeepAliveClient(None, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"{base}/x")
    assert info.value.kind == "network"


async def test_caps_and_encodings(nursery: trio.Nursery) -> None:
    big = b'{"code": 200, "status": "ok", "results": {"b": "' + b"x" * 5000 + b'"}}'
    base, _ = await serve(nursery, [ok(big)])
    async with KeepAliveClient(None, timeout=5) as client:
        with pytest.raises(ResponseTooLarge):
            await request_json(client, "GET", f"{base}/x", max_response_bytes=1000)
    for reply in (chunked(big), b"HTTP/1.1 200 OK\r\n\r\n" + big):
        base, _ = await serve(nursery, [reply])
        async with KeepAliveClient(None, timeout=5) as client:
            with pytest.raises(ResponseTooLarge):
                await request_json(client, "GET", f"{base}/x", max_response_bytes=1000)
    base, _ = await serve(nursery, [ok(extra=b"Content-Encoding: gzip\r\n")])
    async with KeepAliveClient(None, timeout=5) as client:
        with pytest.raises(MalformedResponse):
            await request_json(client, "GET", f"{base}/x")
    async with KeepAliveClient(None, timeout=5) as client:  # a target that would split the request
        with pytest.raises(CommunicationError):
            await request_json(client, "GET", f"{base}/x y\r\nEvil: 1")


async def test_a_reused_connection_times_out_through_the_watchdog(nursery: trio.Nursery, autojump_clock) -> None:
    """A request on a kept connection has no cancel scope of its own: the run's Watchdog
    (actors/common/rawconn.py) expires it, no earlier than its timeout and at most SLACK later."""
    del autojump_clock  # real sockets; the virtual clock jumps while the server stays silent
    from keytrio.actors.common.rawconn import Watchdog

    heads: list[bytes] = []

    async def first_then_silent(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            heads.append(head)
            if len(heads) == 1:
                await stream.send_all(ok())
            else:
                await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, first_then_silent, 0, host="127.0.0.1"))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    with trio.fail_after(100):  # without the watchdog the second request would wait for ever
        async with KeepAliveClient(None, timeout=5) as client:
            assert (await request_json(client, "GET", f"{base}/a")).results == {"n": 1}
            start = trio.current_time()
            with pytest.raises(CommunicationError) as info:
                await request_json(client, "GET", f"{base}/b")
            assert info.value.kind == "timeout"
            assert 5 <= trio.current_time() - start <= 5 + Watchdog.SLACK + 0.01
            assert client._stream is None  # a timed-out connection is not kept
    assert len(heads) == 2  # the second request went over the kept connection
