"""Serve an ASGI (quart-trio) app on hypercorn's trio machinery, inside the caller's nursery.

``await nursery.start(functools.partial(serve, app, host=..., port=0, ssl_context=ctx))`` binds,
returns the bound ``(host, port)`` once serving, and serves until cancelled. Cancellation is a
clean shutdown: no new connections, idle keep-alive connections are closed at once, in-flight
requests get ``graceful_timeout`` seconds to finish, then the app's lifespan shutdown runs.

We keep hypercorn's HTTP/1.1 protocol code (h11 state machine, ASGI stream, lifespan) but own the
accept loop and the per-connection task, because hypercorn 0.18's trio worker has four defects
(STACK_NOTES.md), fixed here (and one cost, 5.):

1. one connection that raises takes down ``serve()`` and its nursery -> every connection runs in
   :meth:`_Server._handle_connection`, which logs and swallows anything it raises;
2. the keep-alive idle timer is lost after each quart-trio request (the timer is (re)started with
   an ``await`` from inside quart's already-cancelled request nursery) -> :class:`_Connection`
   handles hypercorn's ``Updated(idle=...)`` events synchronously by moving the deadline of the
   connection's own cancel scope;
3. rejected TLS handshakes are not logged -> we run the handshake ourselves and log peer address
   and the ssl error text on logger ``keytrio.serve``;
4. the app cannot see the peer certificate -> every HTTP scope carries
   ``scope["extensions"]["tls"]`` (the ASGI TLS extension keys, plus DER forms)::

       {"client_cert_der": bytes | None,        # the client's leaf, DER
        "client_chain_der": list[bytes],        # verified chain, leaf first ([] without a cert)
        "client_cert_chain": list[str],         # the same chain as PEM (ASGI TLS extension)
        "client_cert_name": str | None,         # RFC 4514 subject of the leaf
        "client_cert_error": None,              # the handshake verified whatever was presented
        "tls_version": int | None,              # 0x0303 (TLS 1.2) / 0x0304 (TLS 1.3)
        "cipher_suite": None, "cipher_name": str | None, "server_cert": None}

   On a plain-HTTP server the key is absent. A quart route reads it via ``request.scope``.

5. (speed) every request pays hypercorn's per-request stream, app task and ASGI layers (~1 ms of
   CPU) -> a small, whole request that the app answers without quart (an app with a
   ``fast_routes`` attribute, common.app.FastRoutes: its fast POST routes and the layers in its
   ``lean`` list, e.g. the push cycle's POST and PATCH) is answered by the route directly
   (:meth:`_Connection._read_data`): read by a strict parser of our own and answered from a
   template when it is in a narrow shape (:func:`_lean_request`, a subset of what h11 accepts,
   read to the same headers and body), else parsed by the connection's own h11 state machine;
   anything else, or a request whose rest does not arrive within a second, goes through
   hypercorn as before. A response's head is also written together with its body
   (:class:`_H11Only`).

6. (speed) trio.SSLStream pays per read and per write for conflict detectors, a lock and a
   checkpoint around every transport call -> TLS runs through :class:`TLSServerStream`
   (``ssl.SSLObject`` + two ``MemoryBIO``s on the bare non-blocking socket, as the pull client's
   rawconn.RawConn), for hypercorn's connections and the lean path alike; what callers see is
   what ``trio.SSLStream(server_side=True, https_compatible=True)`` gave them.

HTTP/2 is never spoken: ALPN offers only http/1.1 and the h2c upgrade / prior-knowledge paths of
hypercorn's h11 protocol are disabled, so requests are answered over HTTP/1.1.

Request bodies are bounded by the app's middleware (bodylimit.py), not here.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import socket
import ssl
import time
from typing import Any
from wsgiref.handlers import format_date_time

import h11
import trio
from cryptography import x509
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from keytrio.actors.common.bodylimit import ASGIApp, Scope
from keytrio.actors.common.tls import ReloadingServerContext

log = logging.getLogger("keytrio.serve")

DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
DEFAULT_GRACEFUL_TIMEOUT = 3.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# From the moment a request is under way (its head read; until then the keep-alive timer runs) to
# the end of its answer. Without it a client that sends a head and part of a body, then nothing,
# held its connection (a task, a file descriptor) for ever: the idle timer stops while a request
# is under way and hypercorn sets no read timeout. Every answer of
# these servers takes well under a second; a minute leaves room for slow links and hardware TPMs.
DEFAULT_REQUEST_TIMEOUT = 60.0

# accept() errors that mean "out of resources right now", not "the listener is broken"
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

async def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | ReloadingServerContext | None = None,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (port 0: any free port) until cancelled.

    ``task_status.started((host, port))`` reports the bound address once connections are accepted.
    With ``ssl_context`` (see actors/common/tls.py) the port speaks HTTPS, else plain HTTP; a
    ReloadingServerContext gives each new connection the context of the files as they are now.
    ``listeners``: sockets the caller bound already (startup.bind, so that a port in use fails
    the start before anything else happened); ``host``/``port`` are then ignored. They are closed
    when serving ends. A connection whose request (read, handled, answered) takes longer than
    ``request_timeout`` is closed without an answer; one idle for ``keep_alive_timeout`` too.
    """
    server = _Server(
        app,
        ssl_context=ssl_context,
        keep_alive_timeout=keep_alive_timeout,
        graceful_timeout=graceful_timeout,
        handshake_timeout=handshake_timeout,
        request_timeout=request_timeout,
    )
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.run, listeners, stop)
            task_status.started(bound)
            try:
                await trio.sleep_forever()
            finally:
                # Our cancellation is the shutdown signal: the server body is shielded and
                # winds down by itself (bounded by its own deadlines).
                stop.set()
    finally:
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()


class _Server:
    def __init__(
        self,
        app: ASGIApp,
        *,
        ssl_context: ssl.SSLContext | ReloadingServerContext | None,
        keep_alive_timeout: float,
        graceful_timeout: float,
        handshake_timeout: float,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.app = ASGIWrapper(app)
        #: common.app.FastRoutes of a keytrio app: their small requests skip hypercorn (_FastPath)
        fast = getattr(app, "fast_routes", None)
        # routes are final by now; an app without any keeps hypercorn's plain read loop
        self.fast_routes = fast if fast is not None and (fast.routes or getattr(fast, "lean", None)) else None
        self.ssl_context = ssl_context
        self.keep_alive_timeout = keep_alive_timeout
        self.graceful_timeout = graceful_timeout
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.config = Config()
        self.config.keep_alive_timeout = keep_alive_timeout
        self.config.graceful_timeout = graceful_timeout
        self.config.shutdown_timeout = max(graceful_timeout, 1.0)
        self.config.errorlog = log  # hypercorn's own messages ("Error in ASGI Framework", ...)
        self.config.accesslog = None
        self.config.include_server_header = False  # no server software/version banner
        self.context = WorkerContext(None)
        self.lifespan_state: LifespanState = {}
        self.connections: set[_Connection | _Pending] = set()

    async def run(
        self,
        listeners: list[trio.SocketListener],
        stop: trio.Event,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sockname = listeners[0].socket.getsockname()
        bound = (sockname[0], sockname[1])
        lifespan = Lifespan(self.app, self.config, self.lifespan_state)
        # Shielded: the caller's cancellation arrives as `stop`, so that in-flight requests can
        # finish; every phase after `stop` has its own deadline.
        with trio.CancelScope(shield=True) as shield:
            async with trio.open_nursery() as lifespan_nursery:
                await lifespan_nursery.start(lifespan.handle_lifespan)
                with trio.fail_after(self.config.startup_timeout):
                    await lifespan.wait_for_startup()
                async with trio.open_nursery() as conn_nursery:
                    async with trio.open_nursery() as accept_nursery:
                        for listener in listeners:
                            accept_nursery.start_soon(self._accept_loop, listener, conn_nursery)
                        task_status.started(bound)
                        await stop.wait()
                        accept_nursery.cancel_scope.cancel()
                    shield.deadline = (
                        trio.current_time() + self.graceful_timeout + self.config.shutdown_timeout + 1
                    )
                    await self.context.terminated.set()  # h11 stops recycling connections
                    for conn in list(self.connections):
                        conn.shutdown()
                    conn_nursery.cancel_scope.deadline = trio.current_time() + self.graceful_timeout
                await lifespan.wait_for_shutdown()
                lifespan_nursery.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept failed (%s), pausing 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._handle_connection, stream)

    async def _handle_connection(self, sock_stream: trio.SocketStream) -> None:
        peer = _peer(sock_stream)
        tls_stream: TLSServerStream | None = None
        pending = _Pending()
        self.connections.add(pending)
        try:
            with pending.scope:
                stream: trio.abc.Stream = sock_stream
                tls: dict[str, Any] | None = None
                if self.ssl_context is not None:
                    context = self.ssl_context
                    if isinstance(context, ReloadingServerContext):
                        context = context.current()
                    # the fd leaves trio's SocketStream (TCP_NODELAY that trio set stays); the
                    # TLS stream owns and closes it
                    tls_stream = TLSServerStream(socket.socket(fileno=sock_stream.socket.detach()), context)
                    if not await self._handshake(tls_stream, peer):
                        return
                    stream, tls = tls_stream, _tls_extension(tls_stream)
                app = _WithTLS(self.app, tls) if tls is not None else self.app
                conn = _Connection(
                    app,
                    self.config,
                    self.context,
                    ConnectionState(self.lifespan_state.copy()),
                    stream,  # type: ignore[arg-type]
                    keep_alive_timeout=self.keep_alive_timeout,
                    request_timeout=self.request_timeout,
                    fast_routes=self.fast_routes,
                )
                self.connections.discard(pending)
                self.connections.add(conn)
                try:
                    await conn.run()
                finally:
                    self.connections.discard(conn)
        except Exception:  # isolation boundary: one connection never stops serve()
            log.exception("connection from %s failed", peer)
        finally:
            self.connections.discard(pending)
            if tls_stream is not None:
                await trio.aclose_forcefully(tls_stream)
            await trio.aclose_forcefully(sock_stream)

    async def _handshake(self, stream: TLSServerStream, peer: str) -> bool:
        try:
            with trio.fail_after(self.handshake_timeout):
                await stream.do_handshake()
        except trio.TooSlowError:
            log.warning(
                "TLS handshake from %s rejected: no handshake within %.1f s", peer, self.handshake_timeout
            )
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.warning("TLS handshake from %s rejected: %s", peer, _ssl_reason(exc))
            return False
        return True


#: [config, second, headers]: the last answer of :func:`response_headers`
_HEADERS_MEMO: list[Any] = [None, None, ()]


def response_headers(config: Config) -> tuple[tuple[bytes, bytes], ...]:
    """``config.response_headers("h11")`` (what hypercorn adds to an answer: Date, Server),
    kept for the rest of the second: the Date header (``format_date_time(time())``, a whole
    second) is its only part that changes. The headers of a new second are hypercorn's with the
    Date made from the same clock reading as the memo's key, so that the two cannot disagree."""
    now = time.time()
    second = math.floor(now)  # format_date_time renders time.gmtime(now), which floors too
    memo = _HEADERS_MEMO
    if memo[0] is config and memo[1] == second:
        return memo[2]  # type: ignore[no-any-return]
    date = format_date_time(now).encode("ascii")
    headers = tuple((name, date) if name == b"date" else (name, value)
                    for name, value in config.response_headers("h11"))
    memo[:] = [config, second, headers]
    return headers


class TLSServerStream:
    """The server side of one TLS connection: ``ssl.SSLObject`` over two ``MemoryBIO``s on the
    bare non-blocking socket, in place of ``trio.SSLStream`` (what rawconn.RawConn does for the
    pull client).

    Why: trio.SSLStream pays per read and per write for conflict detectors, an inner lock and a
    checkpoint around every transport call, and trio.SocketStream a ``recv`` that fails with
    EAGAIN before it waits; a push attestation is two small exchanges on a kept connection. Here
    a read waits for the socket once (:func:`trio.lowlevel.wait_readable`) and decrypts what
    came; a write the kernel takes at once is one ``send`` and no task switch.

    The same as ``trio.SSLStream(..., server_side=True, https_compatible=True)`` where callers can
    see it: the handshake (the context's client-certificate rules) raises
    ``trio.BrokenResourceError`` from the ssl/OS error; a peer's close_notify, or EOF without it,
    is read as EOF (b""); any other TLS or socket error is ``trio.BrokenResourceError`` and the
    stream stays broken; ``aclose`` sends no close_notify (https_compatible) and closes the
    socket, waking a task that waits on it with ``trio.ClosedResourceError``. A read and a write
    may run in two tasks at once (hypercorn's read loop and its app task); writes are serialised
    here so that TLS records leave in the order they were made.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl_object = context.wrap_bio(self._in, self._out, server_side=True)
        self._broken: BaseException | None = None
        self._closed = False
        self._sending = False  # a task is sending _out's bytes; others wait on _sent
        self._sent = trio.lowlevel.ParkingLot()
        self._more_ready = False  # the last recv filled its buffer: try again before waiting

    # -- the attributes _tls_extension and _Connection read (as on trio.SSLStream) --
    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl_object.getpeercert(binary_form)

    def cipher(self) -> Any:
        return self._ssl_object.cipher()

    def version(self) -> str | None:
        return self._ssl_object.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl_object.selected_alpn_protocol()

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("TLS connection broken") from self._broken

    def _break(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = exc
        err = trio.BrokenResourceError(str(exc))
        err.__cause__ = exc
        return err

    async def do_handshake(self) -> None:
        """The TLS handshake; BrokenResourceError (from the ssl or OS error) when it fails. The
        alert OpenSSL made for a refused handshake (e.g. "certificate required") is sent on a
        best-effort basis, so that the client learns why."""
        self._check()
        while True:
            try:
                self._ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, ssl.CertificateError) as exc:
                err = self._break(exc)
                self._alert()
                raise err from exc
            await self._flush()
            await self._feed()
        await self._flush()  # Finished, and TLS 1.3's session tickets

    def _alert(self) -> None:
        if self._out.pending and not self._closed:
            try:
                self.socket.send(self._out.read())
            except OSError:
                pass

    async def _feed(self) -> None:
        """Read what the socket has (waiting for it once) into the incoming BIO."""
        sock = self.socket
        try:
            if not self._more_ready:
                await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data = sock.recv(_MAX_RECV)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
        except OSError as exc:  # reset, or the socket closed under us
            if self._closed:
                raise trio.ClosedResourceError("connection closed") from exc
            raise self._break(exc) from exc
        self._more_ready = len(data) == _MAX_RECV
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()  # the next read or handshake step reports the EOF

    async def _flush(self) -> None:
        """Send every TLS byte queued in the outgoing BIO, in order, before returning."""
        if self._sending:  # another task is sending: it also sends ours; wait until it is done
            await self._sent.park()
            self._check()
            return
        if not self._out.pending:
            return
        self._sending = True
        try:
            while self._out.pending:
                view = memoryview(self._out.read())
                while view:
                    try:
                        sent = self.socket.send(view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self.socket)
                        continue
                    view = view[sent:]
        except trio.ClosedResourceError:
            raise
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("connection closed") from exc
            raise self._break(exc) from exc
        except BaseException as exc:  # cancelled mid-record: the byte stream is cut, as in trio
            self._broken = self._broken or exc
            raise
        finally:
            self._sending = False
            self._sent.unpark_all()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Some bytes of the peer's data; b"" at EOF (close_notify or not)."""
        self._check()
        max_bytes = max_bytes or _MAX_RECV
        while True:
            try:
                data = self._ssl_object.read(max_bytes)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise self._break(exc) from exc
            else:
                # data that was waiting decrypted without a wait: still honour a cancellation
                await trio.lowlevel.checkpoint_if_cancelled()
                return data
            await self._flush()  # e.g. the answer to a key update
            await self._feed()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        try:
            self._ssl_object.write(data)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise self._break(exc) from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        """Close the socket (no close_notify: https_compatible, as before); a task waiting on it
        wakes with ClosedResourceError."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
            self._sent.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()


class _Pending:
    """A connection still in its TLS handshake: shutdown simply cancels it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()

    def shutdown(self) -> None:
        self.scope.cancel()


class _H11Only(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without the switch to HTTP/2 (h2c upgrade, PRI preface), and
    with a response's head sent together with its first body bytes.

    hypercorn writes each h11 event on its own: head, body, and the (empty, with Content-Length)
    end of message: three TLS records and syscalls for one small JSON answer. Here the head
    waits for the next event of the response (hypercorn sends the body right after it) and an
    empty write is skipped, so a whole answer is one write.
    """

    _held = b""

    async def _check_protocol(self, event: h11.Request) -> None:
        return None

    async def _send_h11_event(self, event: Any) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            self._held += data
            return
        if self._held:
            data, self._held = self._held + data, b""
        if data:
            await self.send(RawData(data=data))


class _Connection(TCPServer):
    """hypercorn's trio TCPServer with a working idle timer and no HTTP/2.

    The idle timer is the deadline of ``self.scope``, the cancel scope the whole connection runs
    in: ``Updated(idle=True)`` sets it to now + keep_alive_timeout, ``Updated(idle=False)`` (a
    request under way) to now + request_timeout. Moving a deadline never checkpoints, so it also works when hypercorn sends the event
    from quart-trio's already-cancelled request nursery.
    """

    def __init__(self, *args: Any, keep_alive_timeout: float, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 fast_routes: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_alive_timeout = keep_alive_timeout
        self.request_timeout = request_timeout
        self.scope = trio.CancelScope()
        self.idle = True
        self.fast_routes = fast_routes
        #: FastRoutes.direct: the layer whose ``answer`` a lean request may be given without the
        #: ASGI messages (None: every lean request goes through ``fast_routes(scope, ...)``)
        self._direct = getattr(fast_routes, "direct", None)

    async def _read_data(self) -> None:
        """hypercorn's read loop, plus the lean path: a small request for a fast route that is
        here whole is parsed by the connection's own h11 state machine and answered by the
        route (common.app.FastRoutes) directly, without hypercorn's per-request stream, task and
        ASGI layers. Anything else, anything unsure, and a request whose rest does not arrive
        within _FAST_WAIT is fed to hypercorn as before (its timeouts and limits then apply)."""
        held = b""
        read_timeout = self.config.read_timeout
        while True:
            slow = False
            try:
                if held or read_timeout:
                    with trio.fail_after(read_timeout or math.inf):
                        with trio.move_on_after(_FAST_WAIT if held else math.inf) as wait:
                            data = bytes(await self.stream.receive_some(_MAX_RECV))
                    slow = wait.cancelled_caught
                else:  # the common case: no deadline to set up (two cancel scopes per read)
                    data = bytes(await self.stream.receive_some(_MAX_RECV))
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            if slow:  # the rest is slow in coming: hypercorn's ordinary way
                data, held = held, b""
                await self.protocol.handle(RawData(data))
                continue
            if self.fast_routes is not None and data and (held or self._between_requests()):
                held += data
                verdict = _fast_candidate(held, self.fast_routes)
                if verdict is _MORE_BODY or verdict is _MORE_HEAD:
                    if verdict is _MORE_BODY:
                        self._set_idle(False)  # a request is under way: its deadline, not the keep-alive one
                    continue
                if isinstance(verdict, str):
                    data_all, held = held, b""
                    if not await self._serve_fast(data_all, verdict):
                        break
                    continue
                data, held = held, b""
            elif held:  # end of stream while holding: hypercorn sees what came, then the end
                await self.protocol.handle(RawData(held))
                held = b""
            await self.protocol.handle(RawData(data))
            if data == b"":
                break
        await self.protocol.handle(Closed())

    def _between_requests(self) -> bool:
        conn = getattr(self.protocol, "connection", None)
        return (
            isinstance(conn, h11.Connection)
            and conn.our_state is h11.IDLE
            and conn.their_state is h11.IDLE
            and not conn.trailing_data[0]
            and not self.context.terminated.is_set()
        )

    async def _serve_fast(self, data_all: bytes, route_path: str) -> bool:
        """Answer one whole request (``data_all``); False when the connection must close.

        A request in the narrow shape :func:`_lean_request` accepts is read without h11 and
        answered from a template (:func:`_lean_response`); h11's state machine then never sees it
        and stays between requests. Anything outside that shape is parsed by h11 as before (and
        a bad one answered as hypercorn answers it); an answer the template will not write is
        written by h11, after h11 has been given the request."""
        conn: h11.Connection = self.protocol.connection  # type: ignore[attr-defined]
        self._set_idle(False)  # busy: a server shutdown lets this answer finish
        lean = _lean_request(data_all)
        if lean is not None:
            headers_in, body = lean
        else:
            parsed = await self._h11_request(conn, data_all)
            if parsed is None:
                return False
            headers_in, body = parsed
        method = data_all[: data_all.index(b" ")].decode("ascii")
        direct = self._direct(method, route_path) if self._direct is not None else None
        if direct is not None:  # the push cycle's layer, called without the ASGI dicts and closures
            status, headers, payload = await direct.answer(method, route_path, headers_in, body)
            headers = [*headers, *response_headers(self.config)]
        else:
            scope = {"type": "http", "method": method, "path": route_path, "headers": headers_in}
            answer: dict[str, Any] = {}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                answer[message["type"]] = message

            await self.fast_routes(scope, receive, send)
            start, payload = answer["http.response.start"], answer["http.response.body"]["body"]
            status, headers = start["status"], [*start["headers"], *response_headers(self.config)]
        out = _lean_response(status, headers, payload) if lean is not None else None
        if out is None:
            if lean is not None and await self._h11_request(conn, data_all) is None:
                return False  # unreachable: h11 accepts whatever _lean_request does
            out = conn.send(h11.Response(status_code=status, headers=headers))
            out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
            lean = None
        try:
            await self.stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if lean is None:
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return False  # Connection: close (h11 says MUST_CLOSE)
        if self.context.terminated.is_set():
            return False  # shutting down: no next request on this connection
        if lean is None:
            conn.start_next_cycle()
        self._set_idle(True)
        return True

    async def _h11_request(self, conn: h11.Connection, data_all: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
        """The request's headers and body as h11 parses them; None (after hypercorn's error
        answer) when h11 refuses it."""
        conn.receive_data(data_all)
        try:
            request = conn.next_event()
            chunks = []
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # the candidate check makes this unreachable: treat it as a bad request
                    raise h11.RemoteProtocolError("incomplete request", error_status_hint=400)
        except h11.RemoteProtocolError as error:  # as hypercorn answers it: status, then close
            if conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                await self.protocol._send_error_response(error.error_status_hint)  # type: ignore[attr-defined]
            return None
        assert isinstance(request, h11.Request)
        return list(request.headers), chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def run(self) -> None:
        stream: Any = self.stream
        if isinstance(stream, TLSServerStream):
            sock, is_ssl = stream.socket, True
        else:
            sock, is_ssl = stream.socket, False
        with self.scope:
            try:
                client = parse_socket_addr(sock.family, sock.getpeername())
                server = parse_socket_addr(sock.family, sock.getsockname())
                async with TaskGroup() as task_group:
                    self._task_group = task_group
                    self.protocol = _H11Only(  # type: ignore[assignment]
                        self.app,
                        self.config,
                        self.context,
                        task_group,
                        ConnectionState(self.state),
                        is_ssl,
                        client,
                        server,
                        self.protocol_send,
                    )
                    self._set_idle(True)
                    await self._read_data()
            except OSError:
                pass
            finally:
                await self._close()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            self._set_idle(event.idle)  # no await: see the class docstring
            return
        await super().protocol_send(event)

    def _set_idle(self, idle: bool) -> None:
        if not idle and not self.idle:
            return  # a request under way keeps the deadline set when it began (no slow-drip resets)
        self.idle = idle
        self.scope.deadline = trio.current_time() + (self.keep_alive_timeout if idle else self.request_timeout)

    def shutdown(self) -> None:
        """Server shutdown: drop an idle connection now; a busy one closes after its response
        (hypercorn's h11 does not recycle once the worker context is terminated)."""
        if self.idle:
            self.scope.cancel()


_MAX_RECV = 1 << 16
_FAST_MAX = 64 << 10  # only small requests: for larger ones the HTTP layers are not the cost
_FAST_WAIT = 1.0  # seconds the lean path waits for the rest of a request before handing it over
_MORE_HEAD = object()
_MORE_BODY = object()
# no "%" (hypercorn's scope path is the percent-decoded one), no query string: those go to hypercorn
_FAST_LINE = re.compile(rb"(POST|PATCH) (/v[0-9][0-9.]*/[A-Za-z0-9/_.~-]+) HTTP/1\.1\r\n")
_FAST_STARTS = (b"POST /v", b"PATCH /v")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,9})[ \t]*\r\n", re.I)
_NOT_FAST_HEADER = re.compile(rb"\r\n(?:transfer-encoding|expect|upgrade)[ \t]*:", re.I)


def _fast_candidate(held: bytes, fast_routes: Any) -> str | object | None:
    """What the bytes of a new request are for the lean path: the route's path when they are
    one whole request the app answers without quart (``fast_routes.lean_limit``: its fast POST
    routes, the push cycle's POST and PATCH) with head, exactly Content-Length body bytes, nothing after;
    _MORE_HEAD / _MORE_BODY when they may become one, None when not (hypercorn takes them).
    Only a candidate check: the connection's h11 parser still validates the request."""
    m = _FAST_LINE.match(held)
    if m is None:
        if len(held) < 64 and b"\r\n" not in held and any(s.startswith(held[: len(s)]) for s in _FAST_STARTS):
            return _MORE_HEAD
        return None
    path = m.group(2).decode("ascii")
    limit = fast_routes.lean_limit(m.group(1).decode("ascii"), path)
    if limit is None:
        return None
    end = held.find(b"\r\n\r\n")
    if end < 0:
        return _MORE_HEAD if len(held) < 8192 else None
    head = held[: end + 2]
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) != 1 or _NOT_FAST_HEADER.search(head):
        return None
    total = end + 4 + int(lengths[0])
    if int(lengths[0]) > limit or total > _FAST_MAX:
        return None  # hypercorn + BodyLimit answer it (413, or the large body's own way)
    if len(held) < total:
        return _MORE_BODY
    if len(held) > total:
        return None  # pipelined requests: hypercorn keeps their order
    return path


# The lean request shape (a subset of what h11 accepts): header lines of a token name, a colon and
# a value of visible ASCII with inner spaces/tabs; no obs-fold, no obs-text, no bare CR/LF.
_LEAN_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*")
_LEAN_HEAD_MAX = 8192
# headers that change the framing or the connection: h11 decides those
_LEAN_REFUSED = frozenset({b"connection", b"transfer-encoding", b"expect", b"upgrade", b"te", b"keep-alive",
                           b"http2-settings", b"trailer"})


def _lean_line(line: bytes) -> tuple[bytes, bytes] | None:
    """One request header line in the lean shape as (lower-cased name, trimmed value), None when
    it is not strict or names a header of :data:`_LEAN_REFUSED`."""
    m = _LEAN_HEADER.fullmatch(line)
    if m is None:
        return None
    name = m.group(1).lower()
    return None if name in _LEAN_REFUSED else (name, m.group(2))


# _lean_line's answers by line: a push agent repeats the same Host, Content-Type and (for a
# session's life) Authorization lines every cycle, and a dict look-up costs a fraction of the
# regex match. Only short lines are kept and the memo is emptied when full, so a client sending
# ever new lines costs at most _LINE_MEMO_MAX x _LINE_MEMO_LEN bytes here (1 MiB).
_LINE_MEMO_MAX = 4096
_LINE_MEMO_LEN = 256
_REQUEST_LINES: dict[bytes, tuple[bytes, bytes] | None] = {}
_MISS = object()


def _lean_request(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """Headers (names lower-cased, values trimmed: what h11 gives) and body of a whole request
    that :func:`_fast_candidate` accepted, when it is in the lean shape: every header line
    strict, exactly one Host, exactly one Content-Length equal to the body's length, none of
    :data:`_LEAN_REFUSED`, a head of at most 8 KiB. None for anything else: h11 parses it then."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > _LEAN_HEAD_MAX:
        return None
    lines = data[:end].split(b"\r\n")
    if _FAST_LINE.fullmatch(lines[0] + b"\r\n") is None:
        return None
    body = data[end + 4:]
    headers: list[tuple[bytes, bytes]] = []
    hosts = lengths = 0
    memo = _REQUEST_LINES
    for line in lines[1:]:
        pair = memo.get(line, _MISS)
        if pair is _MISS:
            pair = _lean_line(line)
            if len(line) <= _LINE_MEMO_LEN:
                if len(memo) >= _LINE_MEMO_MAX:
                    memo.clear()
                memo[line] = pair
        if pair is None:
            return None
        name, value = pair  # type: ignore[misc]
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths += 1
            if not value.isdigit() or int(value) != len(body):
                return None
        headers.append(pair)  # type: ignore[arg-type]
    if hosts != 1 or lengths != 1:
        return None
    return headers, body


def _response_line(name: bytes, value: bytes) -> tuple[bytes, bytes] | None:
    """A response header as the template writes it (``name: value`` and CRLF) with its lower-cased
    name; None when the template may not write it (not strict, or a header of
    :data:`_LEAN_REFUSED`)."""
    line = name + b": " + value
    m = _LEAN_HEADER.fullmatch(line)
    if m is None or m.group(2) != value:
        return None
    low = name.lower()
    return None if low in _LEAN_REFUSED else (line + b"\r\n", low)


# _response_line's answers by (name, value): an answer's headers are the content type, its
# length, hypercorn's Date (one per second) and Server, and now and then a Location or a
# Retry-After; bounded as _REQUEST_LINES is.
_RESPONSE_LINES: dict[tuple[bytes, bytes], tuple[bytes, bytes] | None] = {}


def _lean_response(status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> bytes | None:
    """The response h11 would write for a request it had parsed in the lean shape (keep-alive,
    not HEAD): status line without reason phrase, the headers as given, the body. None when the
    answer is outside what the template may write (a status h11 would treat otherwise, a header
    that is not strict, no or a wrong Content-Length, framing/connection headers): h11 writes it."""
    if not 200 <= status <= 999 or status in (204, 304):  # h11 frames those bodies its own way
        return None
    parts = [b"HTTP/1.1 %d \r\n" % status]
    lengths = 0
    memo = _RESPONSE_LINES
    for name, value in headers:
        if type(name) is bytes and type(value) is bytes:  # hashable: the memo's keys
            key = (name, value)
            kept = memo.get(key, _MISS)
            if kept is _MISS:
                kept = _response_line(name, value)
                if len(name) + len(value) <= _LINE_MEMO_LEN:
                    if len(memo) >= _LINE_MEMO_MAX:
                        memo.clear()
                    memo[key] = kept
        else:
            kept = _response_line(name, value)
        if kept is None:
            return None
        line, low = kept  # type: ignore[misc]
        if low == b"content-length":
            lengths += 1
            if not value.isdigit() or int(value) != len(payload):
                return None
        parts.append(line)
    if lengths != 1:
        return None
    parts.append(b"\r\n")
    parts.append(payload)
    return b"".join(parts)


class _WithTLS:
    """Per-connection app wrapper that puts the TLS facts into every scope of that connection."""

    def __init__(self, app: Any, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = dict(self.tls)
        await self.app(scope, receive, send, sync_spawn, call_soon)


def _tls_extension(stream: TLSServerStream) -> dict[str, Any]:
    chain = _verified_chain(stream)
    leaf = stream.getpeercert(binary_form=True)
    if leaf and not chain:
        chain = [leaf]
    name = None
    if leaf:
        try:
            name = x509.load_der_x509_certificate(leaf).subject.rfc4514_string()
        except ValueError:
            name = None
    cipher = stream.cipher()
    return {
        "client_cert_der": leaf or None,
        "client_chain_der": chain,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der) for der in chain],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(stream.version() or ""),
        "cipher_suite": None,
        "cipher_name": cipher[0] if cipher else None,
        "server_cert": None,
    }


def _verified_chain(stream: TLSServerStream) -> list[bytes]:
    """The verified client chain (leaf first) as DER; [] when the client sent no cert.

    Python 3.13 has ``SSLObject.get_verified_chain()``; 3.11/3.12 have it only on the private
    ``_sslobj`` (returning ``_ssl.Certificate`` objects).
    """
    obj: Any = stream._ssl_object
    getter = getattr(obj, "get_verified_chain", None) or getattr(obj._sslobj, "get_verified_chain", None)
    if getter is None:
        return []
    certs = getter() or []
    out = []
    for cert in certs:
        out.append(cert if isinstance(cert, bytes) else cert.public_bytes(2))  # 2 == _ssl.ENCODING_DER
    return out


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "<unknown>"
    return f"{addr[0]}:{addr[1]}"


def _ssl_reason(exc: BaseException) -> str:
    """The most specific reason in the exception's cause chain (ssl errors carry OpenSSL's text)."""
    reason = exc
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError | OSError):
            reason = cur
        cur = cur.__cause__ or cur.__context__
    if isinstance(reason, ssl.SSLError):
        # "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)"
        return f"{type(reason).__name__}: {_SSL_SOURCE.sub('', str(reason))}"
    text = str(reason) or type(reason).__name__
    if isinstance(reason, trio.BrokenResourceError) and not str(reason):
        text = "connection closed during handshake"
    return text


__all__ = ["serve"]
