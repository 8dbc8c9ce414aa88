"""serve.py's TLS transport (``TLSServerStream``: ``ssl.SSLObject`` + two ``MemoryBIO``s on the
bare socket, in place of ``trio.SSLStream``) over real TLS sockets on 127.0.0.1.

Two parts:

1. A differential test at the stream level: the same scripted TLS client (good and hostile:
   close_notify, EOF without it, a record cut in the middle, a reset, bytes that are not TLS,
   no / a foreign client certificate, plain HTTP, an abort mid-handshake, a large answer read
   slowly) against a server side run once on ``trio.SSLStream(server_side=True,
   https_compatible=True)`` (what serve.py used before) and once on ``TLSServerStream``: the
   handshake outcome, the bytes read, how the reading ended (EOF or BrokenResourceError) and
   what the client received must be the same.
2. ``serve()`` over TLS with a fast route: a request split over many TLS records, pipelining,
   keep-alive, close_notify, a peer that cuts mid-record, a client without / with a foreign
   certificate refused (and told why), a 2 MB answer to a slow reader, and the request deadline
   and keep-alive timer on trio's MockClock.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from keytrio.actors.common import serve as serve_mod
from keytrio.actors.common.serve import TLSServerStream, serve
from keytrio.actors.common.tls import client_context, server_context
from tests.actors.common.serve_support import _App, echo, read_answer

# ---- a scripted TLS client: each write is its own TLS record, raw bytes on demand ---------------


class Client:
    """TLS over a trio socket with the records in our hands (SSLObject + MemoryBIOs)."""

    def __init__(self, tcp: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        self.tcp = tcp
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="127.0.0.1")
        self.plain = bytearray()

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port), ctx)
        await client.handshake()
        return client

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                data = await self.tcp.receive_some(65536)
                if not data:
                    self.inc.write_eof()
                else:
                    self.inc.write(data)
        await self.flush()

    async def flush(self) -> None:
        if self.out.pending:
            await self.tcp.send_all(self.out.read())

    def record(self, data: bytes) -> bytes:
        """``data`` as TLS record(s), not sent."""
        self.obj.write(data)
        return self.out.read()

    async def send(self, data: bytes) -> None:
        await self.tcp.send_all(self.record(data))

    async def receive(self) -> bytes:
        """Some plaintext; b"" at EOF (close_notify or not)."""
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            data = await self.tcp.receive_some(65536)
            if data:
                self.inc.write(data)
            else:
                self.inc.write_eof()

    async def answer(self) -> tuple[bytes, bytes] | None:
        return await read_answer(self, self.plain)  # type: ignore[arg-type]

    async def receive_some(self, n: int) -> bytes:  # read_answer's interface
        return await self.receive()

    async def close_notify(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        await self.flush()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0)."""
        self.tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.tcp.socket.close()


def client_ctx(pki: Any, who: Any = "client") -> ssl.SSLContext:
    leaf = getattr(pki, who) if who else None
    return client_context([pki.ca], leaf.cert if leaf else None, leaf.key if leaf else None)


def server_ctx(pki: Any, mode: str = "required") -> ssl.SSLContext:
    return server_context(pki.server.cert, pki.server.key, client_ca_files=[pki.ca], mode=mode)


def tcp_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A connected pair of TCP sockets on 127.0.0.1 (server side, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return trio.socket.from_stdlib_socket(server), trio.socket.from_stdlib_socket(client)


# ---- 1. the stream, differential: trio.SSLStream vs TLSServerStream --------------------------


async def run_server_side(kind: str, sock: trio.socket.SocketType, ctx: ssl.SSLContext,
                          answer: bytes) -> dict[str, Any]:
    """Handshake, send ``answer``, read until the end; what happened, in comparable terms."""
    if kind == "trio":
        stream: Any = trio.SSLStream(trio.SocketStream(sock), ctx, server_side=True, https_compatible=True)
    else:
        stream = TLSServerStream(socket.socket(fileno=sock.detach()), ctx)
    out: dict[str, Any] = {"handshake": None, "read": b"", "end": None}
    try:
        try:
            with trio.fail_after(5):
                await stream.do_handshake()
            out["handshake"] = "ok"
        except trio.BrokenResourceError as exc:
            out["handshake"] = "broken"
            out["cause"] = type(exc.__cause__).__name__
            if kind == "trio":  # serve.py's old _flush_alert: the alert trio.SSLStream dropped
                pending = stream._outgoing.read()
                if pending:
                    try:
                        await stream.transport_stream.send_all(pending)
                    except trio.BrokenResourceError:
                        pass
            return out
        if answer:
            await stream.send_all(answer)
        try:
            with trio.fail_after(5):
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        out["end"] = "eof"
                        break
                    out["read"] += data
        except trio.BrokenResourceError as exc:
            out["end"] = "broken"
            out["cause"] = type(exc.__cause__).__name__
        return out
    finally:
        await trio.aclose_forcefully(stream)


async def scripted(script: str, client: Client) -> Any:
    """The client's part; returns what it saw."""
    try:
        await client.handshake()
    except ssl.SSLError as exc:
        return ("handshake failed", exc.reason)
    if script in ("close_notify", "tls12"):
        for part in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            await client.send(part)
        await client.close_notify()
    elif script == "eof":
        await client.send(b"hello")
        await client.tcp.send_eof()
    elif script == "cut_mid_record":
        await client.send(b"whole record")
        rec = client.record(b"x" * 300)
        await client.tcp.send_all(rec[: len(rec) // 2])
        await client.tcp.send_eof()
    elif script == "cut_in_record_header":
        rec = client.record(b"y" * 10)
        await client.tcp.send_all(rec[:3])
        await client.tcp.send_eof()
    elif script == "reset":
        await client.send(b"before reset")
        await trio.sleep(0.05)
        client.reset()
        return "reset"
    elif script == "garbage":
        await client.send(b"ok so far")
        await client.tcp.send_all(b"\x17\x03\x03\x00\x05abcde")  # an application record of junk
        await client.tcp.send_eof()
    elif script == "big_answer":
        got = bytearray()
        while len(got) < 1 << 20:
            data = await client.receive()
            if not data:
                break
            got += data
        await client.close_notify()
        await client.tcp.send_eof()
        return bytes(got) == bytes(range(256)) * (1 << 12)
    try:
        reply = await client.receive()
    except ssl.SSLError as exc:
        reply = ("alert", exc.reason)
    await client.tcp.aclose()
    return reply


SCRIPTS = ["close_notify", "tls12", "eof", "cut_mid_record", "cut_in_record_header", "reset", "garbage", "big_answer"]
REFUSED = ["no_cert", "other_ca"]


@pytest.mark.parametrize("script", SCRIPTS + REFUSED + ["plain_http", "abort_in_handshake"])
async def test_tls_server_stream_behaves_as_trio_sslstream(pki: Any, script: str) -> None:
    results = {}
    for kind in ("trio", "lean"):
        a, b = tcp_pair()
        ctx = server_ctx(pki)
        answer = bytes(range(256)) * (1 << 12) if script == "big_answer" else b""
        if script == "big_answer":  # 1 MiB through small kernel buffers: the writer has to wait
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        async with trio.open_nursery() as nursery:
            server_out: dict[str, Any] = {}

            async def server(kind: str = kind, a: Any = a, ctx: ssl.SSLContext = ctx, answer: bytes = answer,
                             server_out: dict[str, Any] = server_out) -> None:
                server_out.update(await run_server_side(kind, a, ctx, answer))

            nursery.start_soon(server)
            tcp = trio.SocketStream(b)
            if script == "plain_http":
                await tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                client_saw: Any = await tcp.receive_some(65536)
                await tcp.aclose()
            elif script == "abort_in_handshake":
                client = Client(tcp, client_ctx(pki))
                try:
                    client.obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                await client.flush()  # the ClientHello, then EOF
                await tcp.send_eof()
                client_saw = await tcp.receive_some(65536) != b""  # the server's first flight or not
                await tcp.aclose()
            else:
                who = {"no_cert": None, "other_ca": "other_client"}.get(script, "client")
                cctx = client_ctx(pki, who)
                if script == "tls12":  # the server's Finished is its last flight: it must go out
                    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
                client_saw = await scripted(script, Client(tcp, cctx))
        results[kind] = (server_out, client_saw)
    assert results["lean"] == results["trio"], results
    trio_out = results["trio"][0]
    if script in REFUSED or script in ("plain_http", "abort_in_handshake"):
        assert trio_out["handshake"] == "broken"
    else:
        assert trio_out["handshake"] == "ok"


async def test_a_refused_client_is_told_why(pki: Any) -> None:
    """The alert OpenSSL made for a refused handshake reaches the client (trio.SSLStream dropped
    it; serve.py sent it by hand before): a TLS 1.3 client without a certificate reads
    "certificate required" instead of a bare EOF."""
    a, b = tcp_pair()
    async with trio.open_nursery() as nursery:
        out: dict[str, Any] = {}

        async def server() -> None:
            out.update(await run_server_side("lean", a, server_ctx(pki), b""))

        nursery.start_soon(server)
        client = Client(trio.SocketStream(b), client_ctx(pki, None))
        await client.handshake()  # TLS 1.3: the client is done before the server has judged it
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_REQUIRED|certificate required"):
            await client.receive()
        await client.tcp.aclose()
    assert out["handshake"] == "broken"


# ---- 2. serve() over TLS -------------------------------------------------------------------------


async def start_tls(nursery: trio.Nursery, pki: Any, mode: str = "required", **kwargs: Any) -> int:
    _host, port = await nursery.start(partial(serve, _App(), host="127.0.0.1", port=0,
                                              ssl_context=server_ctx(pki, mode), **kwargs))
    return port


def body_of(answer: tuple[bytes, bytes] | None) -> dict[str, Any]:
    assert answer is not None
    assert answer[0].startswith(b"HTTP/1.1 200 "), answer[0]
    return json.loads(answer[1])


async def test_requests_split_pipelined_and_kept_alive(nursery: trio.Nursery, pki: Any) -> None:
    port = await start_tls(nursery, pki)
    client = await Client.connect(port, client_ctx(pki))
    # a whole request in one record (the lean path), three times on the kept connection
    for n in range(3):
        await client.send(echo(b'{"n": %d}' % n))
        assert body_of(await client.answer())["body"] == f'{{"n": {n}}}'
    # one request, every byte its own TLS record
    for byte in echo(b'{"split": true}'):
        await client.send(bytes([byte]))
    assert body_of(await client.answer())["body"] == '{"split": true}'
    # two requests in one record (pipelined: hypercorn's way), answered in order
    await client.send(echo(b'{"p": 1}') + echo(b'{"p": 2}'))
    assert body_of(await client.answer())["body"] == '{"p": 1}'
    assert body_of(await client.answer())["body"] == '{"p": 2}'
    # a request through hypercorn (not a fast route), then a lean one again
    await client.send(b"GET /v1/other HTTP/1.1\r\nHost: x\r\n\r\n")
    assert body_of(await client.answer()) == {"slow": True}
    await client.send(echo())
    assert body_of(await client.answer())["body"] == '{"n": 1}'
    # close_notify: the server ends the connection, nothing more is sent
    await client.close_notify()
    with trio.fail_after(5):
        assert await client.receive() == b""
    await client.tcp.aclose()


async def test_a_peer_that_cuts_mid_record_does_not_stop_the_server(nursery: trio.Nursery, pki: Any) -> None:
    port = await start_tls(nursery, pki)
    client = await Client.connect(port, client_ctx(pki))
    rec = client.record(echo(b'{"cut": 1}'))
    await client.tcp.send_all(rec[: len(rec) - 7])
    await client.tcp.send_eof()
    with trio.fail_after(5):
        assert await client.receive() == b""  # closed, unanswered
    await client.tcp.aclose()
    # a reset mid-request, then a record of junk: the server keeps serving
    client = await Client.connect(port, client_ctx(pki))
    await client.send(echo()[:20])
    client.reset()
    client = await Client.connect(port, client_ctx(pki))
    await client.tcp.send_all(b"\x17\x03\x03\x00\x05abcde")
    with trio.fail_after(5):
        assert await client.receive() == b""
    await client.tcp.aclose()
    client = await Client.connect(port, client_ctx(pki))
    await client.send(echo())
    assert body_of(await client.answer())["body"] == '{"n": 1}'
    await client.tcp.aclose()


@pytest.mark.parametrize("who", [None, "other_client"])
async def test_mtls_refuses_a_missing_or_foreign_client_cert(nursery: trio.Nursery, pki: Any,
                                                             who: str | None) -> None:
    port = await start_tls(nursery, pki, mode="required")
    with pytest.raises(ssl.SSLError):
        client = await Client.connect(port, client_ctx(pki, who))
        await client.send(echo())  # TLS 1.3: the refusal arrives after the client's Finished
        await client.answer()
    client = await Client.connect(port, client_ctx(pki))
    await client.send(echo())
    assert body_of(await client.answer())["body"] == '{"n": 1}'
    await client.tcp.aclose()


async def test_a_large_answer_to_a_slow_reader_arrives_whole(nursery: trio.Nursery, pki: Any) -> None:
    """hypercorn's path writes a 2 MB answer (many sends that wait for room on the socket) while
    its read loop waits on the same connection; the bytes arrive whole and in order."""
    port = await start_tls(nursery, pki)
    client = await Client.connect(port, client_ctx(pki))
    body = b'{"big": "' + b"b" * (1 << 21) + b'"}'
    await client.send(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
    with trio.fail_after(20):
        answer = await client.answer()
    assert answer is not None and answer[0].startswith(b"HTTP/1.1 200")
    assert json.loads(answer[1])["body"] == body.decode()  # over the fast limit: hypercorn's way
    await client.send(echo())
    assert body_of(await client.answer())["body"] == '{"n": 1}'
    await client.tcp.aclose()


async def test_request_deadline_and_keep_alive_timer_over_tls(nursery: trio.Nursery, pki: Any,
                                                              autojump_clock: Any) -> None:
    """On MockClock: an idle kept connection closes after keep_alive_timeout, a request that
    stops half way after the request deadline (lean path and hypercorn's), unanswered."""
    port = await start_tls(nursery, pki, keep_alive_timeout=5.0)
    timeout = serve_mod.DEFAULT_REQUEST_TIMEOUT
    client = await Client.connect(port, client_ctx(pki))
    await client.send(echo())
    assert body_of(await client.answer())["body"] == '{"n": 1}'
    t0 = trio.current_time()
    with trio.fail_after(600):
        assert await client.receive() == b""
    assert 5.0 <= trio.current_time() - t0 <= 6.0
    await client.tcp.aclose()
    for request in (echo(b'{"n": "' + b"a" * 100 + b'"}')[:-10],  # fast route, body cut short
                    b"POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nxx"):
        client = await Client.connect(port, client_ctx(pki))
        await client.send(request)
        t0 = trio.current_time()
        with trio.fail_after(10 * timeout):
            assert await client.receive() == b""
        assert trio.current_time() - t0 <= timeout + 1
        await client.tcp.aclose()
    client = await Client.connect(port, client_ctx(pki))
    await client.send(echo())
    assert body_of(await client.answer())["body"] == '{"n": 1}'
    await client.tcp.aclose()


async def test_concurrent_writes_leave_in_order(pki: Any) -> None:
    """Two tasks write at once (as hypercorn's app task and the read loop's key-update answers
    may): through small kernel buffers each write waits for room, and the other's records must
    queue behind it, not interleave with it."""
    a, b = tcp_pair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    chunks = [bytes([65 + i]) * (300_000 + i) for i in range(4)]
    stream = TLSServerStream(socket.socket(fileno=a.detach()), server_ctx(pki))
    client = Client(trio.SocketStream(b), client_ctx(pki))
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.handshake)
        await stream.do_handshake()
        async with trio.open_nursery() as writers:
            for chunk in chunks:
                writers.start_soon(stream.send_all, chunk)
            while len(got) < sum(map(len, chunks)):
                got += await client.receive()
    await stream.aclose()
    await client.tcp.aclose()
    # every write arrived whole (in some order of the tasks), none cut into another
    pieces, rest = [], bytes(got)
    while rest:
        n = len(rest) - len(rest.lstrip(rest[:1]))
        pieces.append(rest[:n])
        rest = rest[n:]
    assert sorted(pieces) == sorted(chunks)


async def test_close_wakes_a_reader(pki: Any) -> None:
    """aclose from one task (hypercorn closing after ``Connection: close``) while another waits
    to read (the connection's read loop): the reader wakes with ClosedResourceError at once
    instead of waiting on a socket that is gone until the connection's deadline."""
    a, b = tcp_pair()
    stream = TLSServerStream(socket.socket(fileno=a.detach()), server_ctx(pki))
    client = Client(trio.SocketStream(b), client_ctx(pki))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.handshake)
        await stream.do_handshake()
    woke: list[str] = []

    async def reader() -> None:
        try:
            await stream.receive_some(65536)
        except trio.ClosedResourceError:
            woke.append("closed")

    with trio.fail_after(5):  # a guard against a hang, not a timing assertion
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    assert woke == ["closed"]
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"after close")
    await client.tcp.aclose()
