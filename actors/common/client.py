"""mTLS HTTP client: a thin layer over httpx.AsyncClient (which runs under trio via anyio).

* :func:`make_client` — an AsyncClient whose TLS is exactly the given SSLContext (see tls.py;
  the client cert must be loaded into that context: httpx 0.28.1 ignores ``cert=`` next to a
  path ``verify=``).
* :func:`request_json` — one request; the response is read with a size cap and parsed as a
  Keylime envelope. Failures are typed: :class:`CommunicationError` (timeout, refused, TLS,
  network), :class:`HttpError` (an unexpected status), :class:`MalformedResponse` (not an
  envelope, or too large).
* :func:`retry` — Keylime's retry rule on trio's clock (testable with trio.testing.MockClock).
"""

from __future__ import annotations

import json as jsonlib
import math
import ssl
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import urlencode, urlsplit

import httpx
import trio

from keytrio.actors.common import http1
from keytrio.actors.common.rawconn import RawConn, watchdog
from keytrio.protocol import safejson
from keytrio.protocol.envelope import parse as parse_envelope
from keytrio.protocol.errors import DecodeError

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RESPONSE_BYTES = 16 << 20
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0)

#: Upstream Keylime's verifier retries these statuses (and connection errors) only.
RETRY_STATUSES = frozenset({408, 500, 599})

T = TypeVar("T")
CommunicationKind = Literal["timeout", "refused", "tls", "network"]


class ClientError(Exception):
    """Base of every error this module raises."""


class CommunicationError(ClientError):
    """No HTTP response: ``kind`` is timeout, refused, tls or network (reset, EOF, DNS, ...)."""

    def __init__(self, kind: CommunicationKind, url: str, detail: str) -> None:
        super().__init__(f"{kind} talking to {url}: {detail}")
        self.kind = kind
        self.url = url
        self.detail = detail


class HttpError(ClientError):
    """An HTTP response with a status the caller did not expect."""

    def __init__(self, status_code: int, status_text: str, results: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {status_text}")
        self.status_code = status_code
        self.status_text = status_text
        self.results = results or {}


class MalformedResponse(ClientError):
    """A 2xx response that is not a Keylime envelope (or not JSON)."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"malformed response (HTTP {status_code}): {reason}")
        self.status_code = status_code
        self.reason = reason


class ResponseTooLarge(MalformedResponse):
    """The response body exceeded ``max_response_bytes``; reading stopped there."""


class Reply(NamedTuple):
    """A parsed envelope: HTTP status code, envelope status text, envelope results."""

    status_code: int
    status: str
    results: dict[str, Any]


def make_client(
    ssl_context: ssl.SSLContext | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limits: httpx.Limits = DEFAULT_LIMITS,
) -> httpx.AsyncClient:
    """An AsyncClient (HTTP/1.1, no proxies from the environment, no redirects).

    ``ssl_context=None`` is for plain-HTTP peers (the registrar's agent port): https URLs then
    fail verification, because the context used trusts no CA at all (fail closed).
    """
    if ssl_context is None:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing
    return httpx.AsyncClient(
        verify=ssl_context,
        timeout=httpx.Timeout(timeout),
        limits=limits,
        http1=True,
        http2=False,
        trust_env=False,
        follow_redirects=False,
    )


async def request_json(
    client: httpx.AsyncClient | KeepAliveClient,
    method: str,
    url: str,
    json: Any = None,
    *,
    params: Mapping[str, str] | None = None,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    expect: Collection[int] | None = (200,),
    timeout: float | None = None,
) -> Reply:
    """Send one request (``json`` as the body when not None) and parse the envelope.

    ``expect``: statuses that are returned; any other raises :class:`HttpError` (with the
    envelope's status text and results when the body is one). ``expect=None`` returns every
    status that carries an envelope.
    """
    if isinstance(client, KeepAliveClient):
        status_code, reason, body = await _request_keepalive(client, method, url, json, params,
                                                             max_response_bytes, timeout)
        return _parse_reply(status_code, reason, body, expect)
    kwargs: dict[str, Any] = {}
    if json is not None:
        kwargs["json"] = json
    if params is not None:
        kwargs["params"] = params
    if timeout is not None:
        kwargs["timeout"] = httpx.Timeout(timeout)
    try:
        async with client.stream(method, url, **kwargs) as response:
            status_code = response.status_code
            body = await _read_capped(response, max_response_bytes)
    except httpx.DecodingError as exc:
        raise MalformedResponse(-1, f"undecodable body: {exc}") from exc
    except httpx.TransportError as exc:
        raise _communication_error(exc, url) from exc
    return _parse_reply(status_code, response.reason_phrase, body, expect)


def _parse_reply(status_code: int, reason: str, body: bytes, expect: Collection[int] | None) -> Reply:
    try:
        code, status, results = parse_envelope(safejson.loads(body, max_bytes=max(len(body), 1), allow_surrogates=True))
    except DecodeError as exc:  # safejson.JsonError is one
        if expect is not None and status_code not in expect:
            raise HttpError(status_code, reason or "Error") from exc
        raise MalformedResponse(status_code, str(exc)) from exc
    # Upstream answers code == HTTP status; trust the HTTP status if they ever disagree.
    del code
    if expect is not None and status_code not in expect:
        raise HttpError(status_code, status, results)
    return Reply(status_code, status, results)


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection to one peer (the verifier's monitor: one per agent).

    What httpx gives the monitor, at a fraction of its per-request CPU (its pool, auth, cookie
    and redirect layers cost ~1 ms a request; this is a strict HTTP/1.1 exchange (http1.py) over a :class:`RawConn`, TLS through an
    SSLObject on the bare socket): requests go
    one at a time over a single connection, reused while its idle time is under
    ``keepalive_expiry`` and the peer did not close it; a request on a reused connection that
    fails before any response byte is retried once on a fresh one (the peer may have closed
    it just then). The connection is closed after a failed or cancelled request. TLS is exactly
    ``ssl_context`` (server_hostname = the URL's host, as httpx does). ``timeout`` bounds a whole
    request (connect + send + response). No compression is asked for; a compressed reply is
    malformed. Errors are the same as :func:`request_json` raises with an httpx client.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None, *, timeout: float = DEFAULT_TIMEOUT,
                 keepalive_expiry: float = 4.0) -> None:
        self._ctx = ssl_context
        self._timeout = timeout
        self._expiry = keepalive_expiry
        self._stream: RawConn | None = None
        self._bases: dict[str, tuple[tuple[str, str, int], str, str]] = {}
        # the head this peer's replies have had (http1.KnownHead); a peer whose heads differ every
        # time (e.g. a Date field) stops being learnt from after a few misses in a row
        self._known: http1.KnownHead | None = None
        self._head_misses = 0
        self._peer: tuple[str, str, int] | None = None
        self._idle_since = 0.0

    async def aclose(self) -> None:
        await self._drop()

    async def __aenter__(self) -> KeepAliveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _drop(self) -> None:
        conn, self._stream = self._stream, None
        if conn is not None:
            conn.close()

    def _reusable(self, peer: tuple[str, str, int]) -> bool:
        if self._stream is None or self._peer != peer:
            return False
        if trio.current_time() - self._idle_since > self._expiry:
            return False
        # readable while idle: the peer closed (EOF) or sent garbage; either way not reusable
        return not self._stream.is_readable()

    async def _connect(self, peer: tuple[str, str, int]) -> None:
        await self._drop()
        scheme, host, port = peer
        ctx = None
        if scheme == "https":
            ctx = self._ctx if self._ctx is not None else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._stream, self._peer = await RawConn.connect(host, port, ctx), peer

    def _split(self, url: str) -> tuple[tuple[str, str, int], str, str]:
        """(peer, request target, Host value) of ``url``; the part before the query is parsed
        once per client (a monitor asks one agent for the same path every poll)."""
        base, sep, query = url.partition("?")
        hit = self._bases.get(base)
        if hit is None:
            split = urlsplit(base)
            host = split.hostname or ""
            port = split.port or (443 if split.scheme == "https" else 80)
            hit = ((split.scheme, host, port), split.path or "/", split.netloc.rsplit("@", 1)[-1])
            if len(self._bases) < 16:
                self._bases[base] = hit
        peer, path, hostport = hit
        return peer, (path + sep + query) if query else path, hostport

    async def request(self, method: str, url: str, *, body: bytes | None, max_response_bytes: int,
                      timeout: float | None = None) -> tuple[int, str, bytes]:
        """(status, reason, body) of one request; CommunicationError/ResponseTooLarge/MalformedResponse."""
        peer, target, hostport = self._split(url)
        try:
            out = http1.request_bytes(method, target, hostport, body)
            deadline = trio.current_time() + (self._timeout if timeout is None else timeout)
            conn = self._stream
            if conn is not None and self._reusable(peer):
                # the poll's usual case: the deadline is watched by the run's Watchdog, not by a
                # cancel scope of this request (up to Watchdog.SLACK late)
                entry = watchdog().arm(deadline, conn)
                try:
                    return await self._exchange(out, max_response_bytes)
                except _NothingReceived:
                    if conn.expired:
                        raise trio.TooSlowError from None
                    # the idle connection died just now: once more on a fresh one, below
                except trio.ClosedResourceError:
                    if conn.expired:
                        raise trio.TooSlowError from None
                    raise
                finally:
                    entry[2] = None
            with trio.CancelScope(deadline=deadline):  # falling out of it: the deadline passed
                await self._connect(peer)
                return await self._exchange(out, max_response_bytes)
            raise trio.TooSlowError
        except BaseException as exc:
            await self._drop()
            if isinstance(exc, _NothingReceived):
                exc = exc.cause
            if isinstance(exc, trio.TooSlowError):
                raise CommunicationError("timeout", url, "request timed out") from exc
            if isinstance(exc, http1.BodyTooLarge):
                raise ResponseTooLarge(exc.status, str(exc)) from exc
            if isinstance(exc, http1.BadEncoding):
                raise MalformedResponse(exc.status, str(exc)) from exc
            if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                                http1.ProtocolViolation, ssl.SSLError)):
                raise _classify(exc, url) from exc
            raise

    async def _exchange(self, out: bytes, limit: int) -> tuple[int, str, bytes]:
        stream = self._stream
        assert stream is not None
        known = self._known
        reader = http1.Exchange(stream, known, learn=self._head_misses < 3)
        try:
            await stream.send_all(out)
            response = await reader.read(limit)
        except (OSError, trio.BrokenResourceError, http1.ProtocolViolation) as exc:
            if not reader.got_any:
                raise _NothingReceived(exc) from exc
            raise
        if known is not None:
            self._head_misses = 0 if reader.hit else self._head_misses + 1
        self._known = reader.known
        if response.reusable:
            self._idle_since = trio.current_time()
        else:
            await self._drop()
        return response.status, response.reason, response.body


class _NothingReceived(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _transport_kind(exc: BaseException) -> CommunicationKind:
    if _in_chain(exc, ssl.SSLError):
        return "tls"
    if _in_chain(exc, ConnectionRefusedError):
        return "refused"
    return "network"


def _classify(exc: BaseException, url: str) -> CommunicationError:
    kind = _transport_kind(exc)
    if isinstance(exc, http1.ProtocolViolation):
        return CommunicationError(kind, url, f"{type(exc).__name__}: {exc}")
    return CommunicationError(kind, url, _innermost_text(exc))


async def _request_keepalive(client: KeepAliveClient, method: str, url: str, json: Any,
                             params: Mapping[str, str] | None, max_response_bytes: int,
                             timeout: float | None) -> tuple[int, str, bytes]:
    if params:
        url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
    body = jsonlib.dumps(json).encode() if json is not None else None
    return await client.request(method, url, body=body, max_response_bytes=max_response_bytes, timeout=timeout)


def _declared(value: bytes) -> int:
    """A Content-Length value; -1 when it is not 1-20 ASCII digits (the body is capped anyway)."""
    return int(value) if 0 < len(value) <= 20 and value.isdigit() else -1


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and _declared(declared.encode("latin-1", "replace")) > limit:
        raise ResponseTooLarge(response.status_code, f"Content-Length {declared} > {limit} bytes")
    body = bytearray()
    async for chunk in response.aiter_bytes():  # decoded bytes: a gzip bomb counts in full
        body += chunk
        if len(body) > limit:
            raise ResponseTooLarge(response.status_code, f"more than {limit} bytes")
    return bytes(body)


def _communication_error(exc: httpx.TransportError, url: str) -> CommunicationError:
    kind: CommunicationKind = "timeout" if isinstance(exc, httpx.TimeoutException) else _transport_kind(exc)
    return CommunicationError(kind, url, _innermost_text(exc))


def _walk(exc: BaseException) -> list[BaseException]:
    """Every exception reachable through causes, contexts and exception groups (trio's connect
    reports "refused" as a ConnectionRefusedError inside an ExceptionGroup inside an OSError)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        out.append(cur)
        if isinstance(cur, BaseExceptionGroup):
            stack.extend(reversed(cur.exceptions))
        for nxt in (cur.__context__, cur.__cause__):
            if nxt is not None:
                stack.append(nxt)
    return out


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(e, kind) for e in _walk(exc))


def _innermost_text(exc: BaseException) -> str:
    texts = [f"{type(e).__name__}: {e}" for e in _walk(exc) if str(e)]
    return texts[-1] if texts else type(exc).__name__


def is_retryable(exc: BaseException) -> bool:
    """Upstream's rule: connection-level errors and HTTP 408/500/599 are retried."""
    if isinstance(exc, CommunicationError):
        return True
    return isinstance(exc, HttpError) and exc.status_code in RETRY_STATUSES


def retry_delay(attempt: int, interval: float, exponential: bool) -> float:
    """Delay before retry number ``attempt`` (1-based): ``interval ** attempt`` when exponential
    (upstream Keylime's rule, which only applies for interval > 1), else ``interval``. Past the
    float range the delay is ``math.inf`` (callers cap it), never an OverflowError."""
    if exponential and interval > 1:
        try:
            return float(interval) ** attempt
        except OverflowError:
            return math.inf
    return abs(float(interval))


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    retries: int,
    interval: float,
    exponential: bool = False,
    should_retry: Callable[[BaseException], bool] = is_retryable,
    on_retry: Callable[[int, Exception, float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds; after a retryable failure sleep (trio clock) and try again,
    at most ``retries`` times after the first attempt. The last error is re-raised.

    ``on_retry(attempt, error, delay)`` is called before each sleep (log, state "retry", ...).
    """
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as exc:  # filtered by should_retry, re-raised otherwise
            if attempt >= retries or not should_retry(exc):
                raise
            attempt += 1
            delay = retry_delay(attempt, interval, exponential)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
        await trio.sleep(delay)
