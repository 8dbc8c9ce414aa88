"""The reply-head fast path of the KeepAliveClient's exchange (http1.KnownHead) against the general
parser: for the same bytes on a real TCP connection, a reader that knows the peer's last head and
one that does not give the same response or the same error (type and text), on the good head, on
every byte of the head changed, on hostile framings, and on replies that arrive in pieces."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from keytrio.actors.common import http1
from keytrio.actors.common.client import KeepAliveClient, request_json

BODY = b'{"code": 200, "status": "Success", "results": {"n": 1}}'
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-agent: sim\r\n\r\n"
LIMIT = 1000


def reply(body: bytes = BODY, head: bytes = HEAD) -> bytes:
    return (head % len(body) if b"%d" in head else head) + body


async def _read(data: bytes, known: http1.KnownHead | None, piece: int, limit: int = LIMIT) -> tuple[Any, bool]:
    """(outcome, hit) of one Exchange over a real TCP connection whose peer sends ``data`` in
    pieces of ``piece`` bytes and then closes it."""

    async def peer(stream: trio.SocketStream) -> None:
        try:
            for i in range(0, len(data), piece):
                await stream.send_all(data[i:i + piece])
                await trio.sleep(0)
        except trio.BrokenResourceError:
            pass
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer, 0, host="127.0.0.1"))
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        reader = http1.Exchange(stream, known, learn=False)
        try:
            with trio.fail_after(10):
                out: Any = await reader.read(limit)
        except (http1.ProtocolViolation, http1.BodyTooLarge, http1.BadEncoding) as exc:
            out = ("raised", type(exc).__name__, str(exc), getattr(exc, "status", None))
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return out, reader.hit


async def _learn(data: bytes, *, learnt: bool = True) -> http1.KnownHead | None:
    async def peer(stream: trio.SocketStream) -> None:
        await stream.send_all(data)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer, 0, host="127.0.0.1"))
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        reader = http1.Exchange(stream)
        try:
            await reader.read(LIMIT)
        except (http1.ProtocolViolation, http1.BodyTooLarge, http1.BadEncoding):
            pass
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert (reader.known is not None) is learnt and not reader.hit
    return reader.known


async def _same(known: http1.KnownHead, data: bytes, piece: int = 1 << 16, limit: int = LIMIT) -> tuple[Any, bool]:
    general, _ = await _read(data, None, piece, limit)
    fast, hit = await _read(data, known, piece, limit)
    assert fast == general, data
    return general, hit


async def test_the_known_head_is_taken_and_reads_what_the_parser_reads() -> None:
    known = await _learn(reply())
    for body in (BODY, b"{}", b"", BODY * 10):
        out, hit = await _same(known, reply(body))
        assert hit and out == http1.Response(200, "OK", body, True)
    out, hit = await _same(known, reply() + b"HTTP/1.1")  # bytes after it: not reusable
    assert hit and out.reusable is False
    # a head that has not all arrived yet goes to the parser, which waits for the rest
    out, hit = await _same(known, reply(), piece=7)
    assert not hit and out == http1.Response(200, "OK", BODY, True)


@pytest.mark.parametrize("data", [
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 0056\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 56 \r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length:  56\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: \r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: -56\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: +56\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5 6\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 56,56\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: \xd9\xa5\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9999999999999999999\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 99999999999999999999\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1001\r\nx-agent: sim\r\n\r\n"),
    reply(head=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\nx-agent: sim\r\n\r\n"),  # cut
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"content-length: 56\r\n")),
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"transfer-encoding: chunked\r\n")),
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"connection: close\r\n")),
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"content-encoding: gzip\r\n")),
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"x-agent: sim\r\nx-more: 1\r\n")),
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"x-agent: sim\n")),
    reply(head=HEAD.replace(b"x-agent: sim\r\n", b"")),
    reply(head=HEAD.replace(b"200 OK", b"500 Internal Server Error")),
    reply(head=HEAD.replace(b"200 OK", b"204 No Content")),
    reply(head=HEAD.replace(b"HTTP/1.1", b"HTTP/1.0")),
    b"HTTP/1.1 100 Continue\r\n\r\n" + reply(),
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 56\r\nx-agent: sim\r\n",  # no end
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 56",  # cut in the value
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    reply()[:-10],  # connection cut mid-body
    b"",
])
async def test_hostile_framings_give_the_parsers_outcome(data: bytes) -> None:
    known = await _learn(reply())
    for piece in (1 << 16, 5):
        await _same(known, data, piece)


@pytest.mark.parametrize(("head", "learnt"), [
    (HEAD, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", True),
    (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length:%d\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: %d\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: %d\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\ncontent-length: %d \r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ncontent-length: 56\r\n\r\n", False),
    (b"HTTP/1.1 204 No Content\r\ncontent-length: %d\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nx-" + b"a" * 5000 + b": 1\r\ncontent-length: %d\r\n\r\n", False),
])
async def test_what_is_learnt_reads_as_the_parser_reads(head: bytes, learnt: bool) -> None:
    """A head is learnt only when the parser's every conclusion about it holds for the next one
    with another length; whatever was learnt, the next replies read as the parser reads them."""
    known = await _learn(reply(head=head), learnt=learnt)
    if known is None:
        return
    for body in (BODY, b"{}", BODY * 3):
        _, hit = await _same(known, reply(body, head))
        assert hit
    await _same(known, reply(head=head) + b"x")


async def test_every_byte_of_the_head_changed() -> None:
    known = await _learn(reply())
    good = reply()
    head_len = good.index(b"\r\n\r\n") + 4
    hits = 0
    for at in range(head_len):
        for new in (b"0", b"9", b" ", b"\t", b"\r", b"\n", b":", b"x", b"\x00", b"\xff"):
            if good[at:at + 1] == new:
                continue
            _, hit = await _same(known, good[:at] + new + good[at + 1:])
            hits += hit
    assert 0 < hits <= 4  # only a digit of the value for another digit keeps the head known


async def test_the_client_learns_the_head_and_stops_learning_a_changing_one(nursery: trio.Nursery) -> None:
    dated = [HEAD.replace(b"x-agent: sim", b"date: %d" % i) % len(BODY) + BODY for i in range(8)]
    served: list[int] = []

    async def peer(replies: list[bytes], stream: trio.SocketStream) -> None:
        buf = b""
        for data in replies:
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            buf = buf.partition(b"\r\n\r\n")[2]
            served.append(len(data))
            await stream.send_all(data)

    for replies, learnt_at_end in (([reply()] * 4, True), (dated, False)):
        listeners = await nursery.start(partial(trio.serve_tcp, partial(peer, replies), 0, host="127.0.0.1"))
        base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with KeepAliveClient(None, timeout=5) as client:
            for _ in replies:
                assert (await request_json(client, "GET", f"{base}/q?nonce=1")).results == {"n": 1}
            assert client._known is not None
            assert (client._head_misses == 0) is learnt_at_end
            if not learnt_at_end:
                assert client._head_misses == len(replies) - 1  # it kept comparing; learnt from the first four
