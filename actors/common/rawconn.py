"""One client connection as a plain non-blocking socket, TLS through ``ssl.SSLObject`` over two
``MemoryBIO``s: the transport of :class:`actors.common.client.KeepAliveClient`.

Why not ``trio.SSLStream`` over a ``trio.SocketStream``: the verifier's monitors send one small
request and read one short reply per poll, and trio's streams pay for generality on each of
them (conflict detectors and locks in SSLStream, a checkpoint before and after every socket
call, a ``recv`` that fails with EAGAIN before waiting). Here a send that the kernel takes at
once costs one ``send`` syscall and no task switch; a read waits for the socket once
(:func:`trio.lowlevel.wait_readable`, the only checkpoint of a normal exchange) and then
decrypts what arrived. Same TLS as before: the caller's context, ``server_hostname`` for SNI and
the name check, ``close_notify`` sent on close, a missing ``close_notify`` at EOF read as EOF (as
``https_compatible=True`` does: the body framing, not TLS, tells a truncated reply).

Errors: ``OSError`` from the socket, ``ssl.SSLError`` from TLS (certificate, alert, bad record),
``trio.ClosedResourceError`` after :meth:`RawConn.close`.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

from keytrio.actors.common.deadline_heap import DeadlineHeap

_RECEIVE = 65536
#: the idle-connection peek's flags as a plain int: ``MSG_PEEK | MSG_DONTWAIT`` is an IntFlag
#: operation (an enum construction, ≈ 0.8 µs) on every poll; the int is the same bits
_PEEK_FLAGS = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class RawConn:
    """A connected socket (owned: closed by :meth:`close`), with TLS when ``ssl_obj`` is given."""

    __slots__ = ("_in", "_more_ready", "_out", "_sock", "_ssl", "expired")

    def __init__(self, sock: socket.socket, ssl_obj: ssl.SSLObject | None = None,
                 incoming: ssl.MemoryBIO | None = None, outgoing: ssl.MemoryBIO | None = None) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._ssl = ssl_obj
        self._in = incoming
        self._out = outgoing
        # the last recv filled its buffer: more may be waiting, try before waiting for the socket
        self._more_ready = False
        self.expired = False  # a Watchdog deadline passed: every wait fails from now on

    @classmethod
    async def connect(cls, host: str, port: int, ctx: ssl.SSLContext | None) -> RawConn:
        """TCP (trio's connect: every address, happy eyeballs), then the TLS handshake if ``ctx``."""
        tcp = await trio.open_tcp_stream(host, port)
        # the fd leaves trio's wrapper; TCP_NODELAY that trio set on it stays
        sock = socket.socket(fileno=tcp.socket.detach())
        if ctx is None:
            return cls(sock)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        conn = cls(sock, ctx.wrap_bio(incoming, outgoing, server_hostname=host), incoming, outgoing)
        try:
            await conn._handshake()
        except BaseException:
            conn.close(notify=False)
            raise
        return conn

    def _live(self) -> socket.socket:
        if self._sock is None or self.expired:
            raise trio.ClosedResourceError("connection closed" if self._sock is None else "deadline passed")
        return self._sock

    def expire(self) -> None:
        """(Watchdog) The exchange's deadline passed: wake its wait with ClosedResourceError."""
        self.expired = True
        if self._sock is not None:
            trio.lowlevel.notify_closing(self._sock)

    async def _handshake(self) -> None:
        assert self._ssl is not None and self._in is not None
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._recv()
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()  # the next do_handshake raises SSLEOFError
        await self._flush()

    async def _flush(self) -> None:
        """Send what TLS queued (handshake messages, records)."""
        assert self._out is not None
        if self._out.pending:
            await self._send_raw(self._out.read())

    async def _send_raw(self, data: bytes) -> None:
        sock = self._live()
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._live())
                continue
            view = view[sent:]

    async def _recv(self) -> bytes:
        sock = self._live()
        if not self._more_ready:
            await trio.lowlevel.wait_readable(sock)
        while True:
            try:
                data = self._live().recv(_RECEIVE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            self._more_ready = len(data) == _RECEIVE
            return data

    async def send_all(self, data: bytes) -> None:
        if self._ssl is None:
            await self._send_raw(data)
            return
        self._live()
        self._ssl.write(data)
        await self._flush()

    async def receive_some(self, max_bytes: int = _RECEIVE) -> bytes:
        """Some bytes of the peer's data; b"" at EOF."""
        if self._ssl is None:
            return await self._recv()
        assert self._in is not None
        while True:
            try:
                return self._ssl.read(max_bytes)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or EOF without it (the framing decides if that is short)
            await self._flush()  # e.g. a key update's answer
            data = await self._recv()
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()

    def is_readable(self) -> bool:
        """True when bytes (or EOF) wait on the socket: on an idle keep-alive connection the peer
        closed it or sent something unasked; either way it is not reusable."""
        sock = self._sock
        if sock is None:
            return True
        if self._in is not None and self._in.pending:
            return True
        # a peek, not select(): a verifier of 1,000+ agents holds sockets past FD_SETSIZE (1024),
        # where select() raises "filedescriptor out of range" (the fleet benchmark found it)
        try:
            sock.recv(1, _PEEK_FLAGS)
        except BlockingIOError:
            return False
        except OSError:
            return True  # e.g. reset: not reusable either
        return True  # a byte, or b"" at EOF

    def close(self, *, notify: bool = True) -> None:
        """Close now (no waiting): TLS's close_notify goes out if the socket takes it at once."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if notify and self._ssl is not None and self._out is not None:
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass  # SSLWantReadError: our close_notify is queued, theirs is not awaited
                if self._out.pending:
                    try:
                        sock.send(self._out.read())
                    except OSError:
                        pass
        finally:
            sock.close()


class Watchdog(DeadlineHeap):
    """The deadlines of requests on kept connections, one task for all of them (per trio run).

    A per-request cancel scope with a deadline (enter, deadline registration, close) was the
    largest part of trio's share of a poll. Here a request pushes ``[deadline, seq, conn]`` on a
    heap and clears the entry when it ends; one system task sleeps until the earliest deadline
    (+ ``SLACK``: deadlines close together share a wake-up) and expires the connections whose
    request still runs then (:meth:`RawConn.expire`: its wait raises ClosedResourceError, the
    caller reports a timeout). It runs only while entries are pending.
    """

    SLACK = 0.5

    def __init__(self) -> None:
        super().__init__(self.SLACK)

    def arm(self, deadline: float, conn: RawConn) -> list[Any]:
        """Watch ``conn`` until ``deadline``; set ``entry[2] = None`` when the request is over."""
        return self._push(deadline, conn)

    def _spawn(self, fn: Any, scope: trio.CancelScope) -> None:
        trio.lowlevel.spawn_system_task(fn, scope, name="keytrio.rawconn.watchdog")

    def _due(self, conn: RawConn) -> None:
        conn.expire()


_WATCHDOG: trio.lowlevel.RunVar[Watchdog] = trio.lowlevel.RunVar("keytrio_rawconn_watchdog")


def watchdog() -> Watchdog:
    """The Watchdog of the current trio run."""
    try:
        return _WATCHDOG.get()
    except LookupError:
        dog = Watchdog()
        _WATCHDOG.set(dog)
        return dog
