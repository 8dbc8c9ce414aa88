"""The push attestation cycle's two requests without quart's request machinery.

``POST /v3[.0]/agents/{id}/attestations`` and ``PATCH /v3[.0]/agents/{id}/attestations/{n|latest}``
are what every push agent sends every interval; quart's request context, routing and hooks cost
about as much CPU as the rest of the cycle's work together. :class:`FastCycle` sits where
common.app's FastRoutes does (inside BodyLimit: the body arrives whole and within the route's
limit, the ``evidence`` limit for the PATCH since the quart routes stay registered) and answers
exactly these two shapes itself with routes.Cycle, the code the quart views run: same
content-type check, JSON decoding (protocol.safejson), JSON:API documents, ``Location`` and
``Retry-After`` headers. Anything else (another method, a trailing slash, other paths) goes on to
quart. Both routes are public at the TLS layer (the bearer token is the credential), so no
client-certificate check is skipped.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Protocol

from keytrio.actors.common.app import (
    ApiError,
    content_type_refusal,
    decode_object,
    header,
    json_head,
    receive_body,
    send_json_bytes,
)
from keytrio.actors.common.bodylimit import ASGIApp, Receive, Scope, Send
from keytrio.protocol import push_wire
from keytrio.protocol.push_wire import WireError

log = logging.getLogger("keytrio.verifier")

Answer = tuple[int, dict[str, Any], dict[str, str]]


class Cycle(Protocol):
    """What the fast layer needs of routes.Cycle (a Protocol, so routes may import this module)."""

    async def capabilities(self, prefix: str, agent_id: str, authorization: str | None,
                           doc: object | WireError) -> Answer: ...

    async def evidence(self, prefix: str, agent_id: str, which: str, authorization: str | None,
                       doc: object | WireError) -> Answer: ...

_CAPABILITIES = re.compile(r"^(/v3(?:\.0)?)/agents/([^/]+)/attestations$")
_EVIDENCE = re.compile(r"^(/v3(?:\.0)?)/agents/([^/]+)/attestations/([^/]+)$")


class FastCycle:
    """ASGI layer: the cycle's two requests answered here, everything else passed to ``app``."""

    def __init__(self, app: ASGIApp, cycle: Cycle, limits: tuple[int, int] = (1 << 20, 1 << 20)) -> None:
        self.app = app
        self.cycle = cycle
        #: body limits of the capabilities POST and the evidence PATCH (BodyLimit's, per route)
        self.limits = limits

    def lean_limit(self, method: str, path: str) -> int | None:
        """The body limit when this layer answers ``method path`` (serve.py's lean path may then
        hand it here whole, without hypercorn's stream and quart), else None."""
        if method == "POST" and _CAPABILITIES.match(path):
            return self.limits[0]
        if method == "PATCH" and _EVIDENCE.match(path):
            return self.limits[1]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope.get("method"), str(scope.get("path") or "")
        m = None
        if scope.get("type") == "http" and path.startswith("/v3"):
            if method == "POST":
                m = _CAPABILITIES.match(path)
            elif method == "PATCH":
                m = _EVIDENCE.match(path)
        if m is None:
            await self.app(scope, receive, send)
            return
        answer = await self._answer(method, path, m, scope.get("headers") or (), None, receive)
        if answer is None:
            return  # the client went away
        status, headers, payload = answer
        await send_json_bytes(send, status, payload, headers)

    async def answer(self, method: str, path: str, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """serve.py's lean path: the answer to a whole request that :meth:`lean_limit` accepted
        (``method path``; FastRoutes.direct checked that nothing sits between) as status, headers
        and JSON body: what ``__call__`` sends in its two ASGI messages."""
        m = (_CAPABILITIES if method == "POST" else _EVIDENCE).match(path)
        assert m is not None  # lean_limit matched the same
        answer = await self._answer(method, path, m, headers, body, None)
        assert answer is not None  # only a receive can find the client gone
        status, extra, payload = answer
        return status, json_head(payload, extra), payload

    async def _answer(self, method: str, path: str, m: re.Match[str], headers_in: Any, raw: bytes | None,
                      receive: Receive | None) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The answer to the request (its body ``raw``, or read from ``receive`` inside the same
        ``try`` as before, so an error there is the route's 500 too); None when the client went away."""
        headers: dict[str, str] = {}
        try:
            if raw is None:
                raw = await receive_body(receive)  # type: ignore[arg-type]
                if raw is None:
                    return None
            doc = self._decode({"headers": headers_in}, raw, surrogates=method == "PATCH")
            auth = header({"headers": headers_in}, b"authorization")
            if method == "POST":
                status, out, headers = await self.cycle.capabilities(m.group(1), m.group(2), auth, doc)
            else:
                status, out, headers = await self.cycle.evidence(m.group(1), m.group(2), m.group(3), auth, doc)
        except WireError as exc:
            status, out = exc.status, push_wire.error_document(exc.status, exc.detail, exc.code)
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        except Exception as exc:  # the route's 500, as quart's handler gives it: logged, no text out
            log.error("unhandled error in %s %s", method, path, exc_info=(type(exc), exc, exc.__traceback__))
            status, out, headers = 500, push_wire.error_document(500, "Internal Server Error"), {}
        return status, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()], \
            json.dumps(out).encode()

    @staticmethod
    def _decode(scope: Scope, raw: bytes, *, surrogates: bool) -> dict[str, Any] | WireError:
        """The JSON object or its refusal (answered after the token checks, as the quart route
        does)."""
        try:
            refused = content_type_refusal(scope)
            if refused is not None:
                raise refused
            return decode_object(raw, surrogates)
        except ApiError as exc:
            return WireError(exc.code, exc.status)
