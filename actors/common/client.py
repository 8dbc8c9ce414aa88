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
import ssl
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Literal, NamedTuple, TypeVar

import httpx
import trio

from protocol.envelope import parse as parse_envelope
from protocol.errors import DecodeError

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
    client: httpx.AsyncClient,
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

    try:
        code, status, results = parse_envelope(jsonlib.loads(body))
    except (ValueError, DecodeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if expect is not None and status_code not in expect:
            raise HttpError(status_code, response.reason_phrase or "Error") from exc
        raise MalformedResponse(status_code, str(exc)) from exc
    # Upstream answers code == HTTP status; trust the HTTP status if they ever disagree.
    del code
    if expect is not None and status_code not in expect:
        raise HttpError(status_code, status, results)
    return Reply(status_code, status, results)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(response.status_code, f"Content-Length {declared} > {limit} bytes")
    body = bytearray()
    async for chunk in response.aiter_bytes():  # decoded bytes: a gzip bomb counts in full
        body += chunk
        if len(body) > limit:
            raise ResponseTooLarge(response.status_code, f"more than {limit} bytes")
    return bytes(body)


def _communication_error(exc: httpx.TransportError, url: str) -> CommunicationError:
    kind: CommunicationKind
    if isinstance(exc, httpx.TimeoutException):
        kind = "timeout"
    elif _in_chain(exc, ssl.SSLError):
        kind = "tls"
    elif _in_chain(exc, ConnectionRefusedError):
        kind = "refused"
    else:
        kind = "network"
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
    (upstream Keylime's rule, which only applies for interval > 1), else ``interval``."""
    if exponential and interval > 1:
        return float(interval**attempt)
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
