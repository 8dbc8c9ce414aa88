"""A quart-trio app factory with keytrio's HTTP conventions.

* Every answer, errors included, is the envelope ``{"code", "status", "results"}``.
* Versioned routes: ``@app.api.route("/agents/<agent_id>", methods=["GET"])`` is served at
  ``/v2.0/agents/<agent_id>`` ... for each version of the app; the handler finds the version in
  ``g.api_version``. A well-formed but unsupported version prefix (``/v9.9/...``) answers 400 with
  status ``API version not supported`` (the text upstream's verifier renegotiates on).
* Client certificates (CERT_OPTIONAL servers): public routes (``/version``, ``/verify/*``) work
  without one; every other path needs a client cert whose verified chain contains one of the
  configured CAs and that may act as a TLS client (extended key usage with clientAuth; none at
  all only while ``require_client_eku`` is off), else a JSON 403. The cert comes from the scope
  entry serve.py adds (``scope["extensions"]["tls"]``).
* Body limits per route: ``max_upload_size`` by default, a named larger limit for the routes that
  carry logs or policies (``make_app(body_limits={"evidence": (size, "max_evidence_size")})`` and
  ``@app.api.route(..., body_limit="evidence")``). A body over its route's limit gets a 413
  envelope naming the option that raises it (bodylimit.BodyLimit), before the app reads it.
* ``await json_body()`` returns a dict or answers 400: the body goes through protocol.safejson,
  the one guarded decoder (size, depth, digits, duplicate keys, NaN, UTF-8).
* Fast routes: a public JSON POST route may also give ``fast=handler`` (``async (doc, version) ->
  results``). A request for exactly ``/v<version>/<rule>`` of a version the route serves is then
  answered by :class:`FastRoutes` without quart's request machinery (request context, routing,
  hooks: ~1 ms of CPU a request), with the same body limit, content-type check, JSON decoding,
  envelope, ApiError and 500 handling; anything else (a trailing slash, another method or
  version) still goes through quart and its route. ``fast_echo="claims"``: the handler returns
  the body's ``data`` object itself in ``results["claims"]``; the answer then carries the body's
  own bytes of it (:func:`echoed_text`) instead of encoding it a second time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from quart import Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter
from werkzeug.routing.exceptions import RoutingException

from keytrio import __version__
from keytrio.actors.common import openapi
from keytrio.actors.common.bodylimit import DEFAULT_MAX_UPLOAD_SIZE, ASGIApp, BodyLimit, Receive, Scope, Send
from keytrio.actors.common.tls import client_cert_purpose
from keytrio.protocol import safejson, validation
from keytrio.protocol.envelope import envelope
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.versions import UNSUPPORTED_VERSION_STATUS

log = logging.getLogger("keytrio.app")

_VERSION_PREFIX = re.compile(r"^/v(\d+(?:\.\d+)*)(/.*)?$")


class ApiError(Exception):
    """Raise from a handler to answer ``code`` with ``status`` (never put secrets in it)."""

    def __init__(self, code: int, status: str, results: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code} {status}")
        self.code = code
        self.status = status
        self.results = results or {}


def bad_request(exc: ProtocolError) -> ApiError:
    """A 400 for invalid input; protocol errors name the field and never carry secrets."""
    return ApiError(400, f"Bad request: {exc}")


def parse_agent_id(raw: str) -> str:
    """The agent id of a URL path, normalised; a 400 when it is not one."""
    try:
        return validation.agent_id(raw, "agent_id")
    except ProtocolError as exc:
        raise bad_request(exc) from None


def json_response(
    code: int = 200, results: dict[str, Any] | None = None, status: str | None = None
) -> Response:
    """An envelope response (status defaults to "Success" / the HTTP reason phrase)."""
    body = json.dumps(envelope(code, status, results))
    return Response(body, status=code, mimetype="application/json")


def ok(results: dict[str, Any] | None = None, status: str = "Success") -> Response:
    return json_response(200, results, status)


def client_cert_der() -> bytes | None:
    """The client's leaf certificate (DER) of the current request, if it presented one."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    return tls.get("client_cert_der")


def client_chain_der() -> list[bytes]:
    """The client's verified chain (DER, leaf first) of the current request; [] without one."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    return list(tls.get("client_chain_der") or [])


# Content types accepted for a JSON body. Missing and form-urlencoded are here on purpose:
# tornado's HTTP client (upstream Keylime's verifier) sends a JSON body with no Content-Type set
# by the caller, which tornado labels application/x-www-form-urlencoded.
_JSON_TYPES = {"", "application/json", "text/plain", "application/x-www-form-urlencoded"}

#: A fast route's handler: (JSON body object, API version) -> results of a 200, or ApiError.
FastHandler = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]


def _unsupported_type(mimetype: str) -> ApiError | None:
    if mimetype not in _JSON_TYPES and not mimetype.endswith("+json"):
        return ApiError(400, f"Unsupported content type {mimetype!r}: expected application/json")
    return None


def decode_object(raw: bytes, allow_surrogates: bool) -> dict[str, Any]:
    """A JSON body as an object (protocol.safejson), else an :class:`ApiError` 400."""
    try:
        doc = safejson.loads(raw, allow_surrogates=allow_surrogates)
    except safejson.JsonError as exc:
        raise ApiError(400, f"Malformed JSON body: {exc.reason}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "JSON body must be an object")
    return doc


async def json_body(*, allow_surrogates: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, else an :class:`ApiError` 400.

    ``allow_surrogates``: for bodies that carry IMA lists (file names that are not UTF-8 arrive
    as surrogate escapes) and are never stored as text.
    """
    refused = _unsupported_type((request.mimetype or "").lower())
    if refused is not None:
        raise refused
    # cache=False: quart drops its buffer, so the body is held once (plus the decoded text)
    raw = await request.get_data(cache=False, as_text=False)
    return decode_object(raw, allow_surrogates)


class _FastRoute:
    __slots__ = ("allow_surrogates", "body_limit", "echo", "handler", "versions")

    def __init__(self, handler: FastHandler, versions: tuple[str, ...], body_limit: tuple[int, str],
                 allow_surrogates: bool, echo: str | None = None) -> None:
        self.handler = handler
        self.versions = frozenset(versions)
        self.body_limit = body_limit
        self.allow_surrogates = allow_surrogates
        self.echo = echo


_JSON_WS = " \t\n\r"
_JSON_WS_BYTES = _JSON_WS.encode()
_ECHO_PREFIX_MAX = 4096  # the members before the echoed one must lie within this many bytes
_SCAN = json.JSONDecoder()


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_WS:
        i += 1
    return i


def _rstrip_ws(raw: bytes, end: int) -> int:
    """``end`` moved left past JSON whitespace (no copy of a large body, as rstrip would make)."""
    while end and raw[end - 1] in _JSON_WS_BYTES:
        end -= 1
    return end


def echoed_text(raw: bytes, doc: dict[str, Any], key: str) -> memoryview | None:
    """The bytes of ``doc[key]`` as ``raw`` (the body ``doc`` was decoded from) carries them, or
    None when that is not cheap to find: ``key`` must be the body's last member (its value then
    runs to the closing brace) and the body ASCII (byte and character positions agree); the
    members before it are skipped with the JSON scanner within the first few KiB."""
    if not doc or next(reversed(doc)) != key or not raw.isascii():
        return None
    end = _rstrip_ws(raw, len(raw))  # the object's closing brace is the last byte
    window = raw[:_ECHO_PREFIX_MAX].decode("ascii")
    try:
        i = _skip_ws(window, 0)
        if window[i] != "{":
            return None
        i += 1
        for name in doc:  # in the text's order (safejson keeps it and refuses duplicate keys)
            i = _skip_ws(window, i)
            if window[i] != '"':
                return None
            found, i = json.decoder.scanstring(window, i + 1)  # type: ignore[attr-defined]
            i = _skip_ws(window, i)
            if found != name or window[i] != ":":
                return None
            i = _skip_ws(window, i + 1)
            if name == key:
                stop = _rstrip_ws(raw, end - 1)
                return memoryview(raw)[i:stop] if stop > i else None
            _, i = _SCAN.raw_decode(window, i)
            i = _skip_ws(window, i)
            if window[i] != ",":
                return None
            i += 1
    except (ValueError, IndexError):  # a member runs past the window (or the text is odd): encode
        return None
    return None


class FastRoutes:
    """ASGI layer (inside BodyLimit, so the body arrives whole and bounded) that answers the fast
    routes' requests itself; every other request goes to ``app`` (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: unversioned rule ("/verify/evidence") -> route; POST only
        self.routes: dict[str, _FastRoute] = {}
        #: layers below this one that answer requests of their own without quart (the push
        #: cycle's FastCycle): ``lean_limit(method, path) -> body limit | None``, see lean_limit
        self.lean: list[Any] = []

    def lean_limit(self, method: str, path: str) -> int | None:
        """The body limit of a request this layer (or one of ``lean``) answers without quart,
        None when quart must: serve.py's lean path takes only such requests."""
        route = self.match({"type": "http", "method": method, "path": path})
        if route is not None:
            return route.body_limit[0]
        for layer in self.lean:
            limit = layer.lean_limit(method, path)
            if limit is not None:
                return int(limit)
        return None

    def direct(self, method: str, path: str) -> Any | None:
        """The layer of ``lean`` that answers ``method path`` when it is the one this layer would
        pass the request to (``self.app``, nothing in between) and no fast route of this layer
        takes it: serve.py's lean path then calls its ``answer`` without the ASGI messages.
        None: the request goes through ``__call__`` as before."""
        app = self.app
        if app not in self.lean or app.lean_limit(method, path) is None:
            return None
        if self.match({"type": "http", "method": method, "path": path}) is not None:
            return None
        return app

    def match(self, scope: Scope) -> _FastRoute | None:
        if not self.routes or scope.get("method") != "POST" or scope.get("type") != "http":
            return None
        m = _VERSION_PREFIX.match(scope.get("path") or "")
        if m is None:
            return None
        route = self.routes.get(m.group(2) or "")
        return route if route is not None and m.group(1) in route.versions else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.match(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        version = _VERSION_PREFIX.match(scope["path"]).group(1)  # type: ignore[union-attr]
        try:
            refused = content_type_refusal(scope)
            if refused is not None:
                raise refused
            raw = await receive_body(receive)
            if raw is None:
                return  # the client went away
            doc = decode_object(raw, route.allow_surrogates)
            results = await route.handler(doc, version)
            if route.echo is not None and results.get(route.echo) is doc.get("data"):
                body = _echo_answer(raw, doc, results, route.echo)
                if body is not None:
                    del raw, doc, results
                    await send_json_bytes(send, 200, body)
                    return
            del raw, doc
            code, status = 200, "Success"
        except ApiError as exc:
            code, status, results = exc.code, exc.status, exc.results
        except Exception as exc:  # the route's 500, as quart's handler gives it: log, no text out
            log.error("unhandled error in POST %s", scope.get("path"), exc_info=(type(exc), exc, exc.__traceback__))
            code, status, results = 500, None, None
        await send_json(send, code, envelope(code, status, results))


def _echo_answer(raw: bytes, doc: dict[str, Any], results: dict[str, Any], echo: str) -> bytes | None:
    """The 200 answer with ``results[echo]`` (the body's ``data``, unchanged) as the body's own
    bytes of it instead of a second encoding of a large value; None: encode it the usual way.
    The echoed member must be the last of ``results`` (the envelope's last member), so the
    encoded answer with a null there ends in ``null}}`` and the bytes go in its place."""
    if next(reversed(results)) != echo:
        return None
    text = echoed_text(raw, doc, "data")
    if text is None:
        return None
    head = json.dumps(envelope(200, "Success", {**results, echo: None})).encode()
    if not head.endswith(b"null}}"):
        return None
    return b"".join((head[:-6], text, b"}}"))


# --- ASGI helpers of the fast layers (FastRoutes here, the push cycle's FastCycle) -----------------


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower-case bytes), None if absent."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def content_type_refusal(scope: Scope) -> ApiError | None:
    """The 400 for a body that is not declared JSON (as json_body checks it), else None."""
    value = header(scope, b"content-type") or ""
    return _unsupported_type(value.split(";", 1)[0].strip().lower())


async def receive_body(receive: Receive) -> bytes | None:
    """The whole request body (BodyLimit has bounded it), None when the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(send: Send, status: int, doc: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response: status, content type and length, ``headers``, the body."""
    await send_json_bytes(send, status, json.dumps(doc).encode(), headers)


async def send_json_bytes(send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """:func:`send_json` for an answer already encoded."""
    await send({"type": "http.response.start", "status": status, "headers": json_head(body, headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def json_head(body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """The headers of a JSON answer of ``body``: content type and length, then ``headers``
    (:func:`send_json_bytes`'s, and those of a lean layer's direct answer, see FastRoutes.direct)."""
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]

class _VersionConverter(BaseConverter):
    regex = r"\d+(?:\.\d+)*"


class ApiRoutes:
    """Registers a route once for every API version of the app (see the module docstring)."""

    def __init__(self, app: KeytrioApp) -> None:
        self._app = app
        #: endpoint -> versions it is served for
        self.endpoint_versions: dict[str, tuple[str, ...]] = {}

    def route(
        self,
        rule: str,
        *,
        methods: Iterable[str] = ("GET",),
        public: bool = False,
        versions: Iterable[str] | None = None,
        endpoint: str | None = None,
        body_limit: str | None = None,
        fast: FastHandler | None = None,
        allow_surrogates: bool = False,
        fast_echo: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``rule`` without the version prefix, e.g. ``"/agents/<agent_id>"``.

        ``versions``: a subset of the app's versions (a route added in v2.2); asked with another
        version the app supports it answers 404. ``public``: served without a client cert.
        ``body_limit``: a key of make_app's ``body_limits`` (default: ``max_upload_size``).
        ``fast``: the same route as a fast handler (module docstring; public POST routes only),
        its JSON body decoded with ``allow_surrogates``; the quart view stays for the rest.
        ``fast_echo``: the results member in which the fast handler returns the body's ``data``
        member itself, unchanged (``/verify/evidence``'s ``claims``): the answer then carries the
        body's own bytes of it when they are cheap to find (FastRoutes: no second encoding).
        """
        if fast is not None and (not public or tuple(methods) != ("POST",) or "<" in rule):
            raise ValueError("fast routes are public POST routes without path variables")
        if body_limit is not None and body_limit not in self._app.body_limits:
            raise ValueError(f"unknown body limit {body_limit!r}")
        if not rule.startswith("/"):
            raise ValueError("rule must start with '/'")
        app_versions = self._app.api_versions
        route_versions = tuple(versions) if versions is not None else app_versions
        unknown = set(route_versions) - set(app_versions)
        if unknown:
            raise ValueError(f"versions {sorted(unknown)} are not served by this app")

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            name = endpoint or func.__name__
            if name in self.endpoint_versions:
                raise ValueError(f"endpoint {name!r} registered twice")
            self.endpoint_versions[name] = route_versions
            if public:
                self._app.public_endpoints.add(name)
            if body_limit is not None:
                self._app.endpoint_body_limits[name] = self._app.body_limits[body_limit]
            if fast is not None:
                limit = self._app.body_limits[body_limit] if body_limit is not None else self._app.default_body_limit
                self._app.fast_routes.routes[rule] = _FastRoute(
                    fast, route_versions, limit, allow_surrogates, fast_echo
                )
            self._app.add_url_rule(
                "/v<apiversion:api_version>" + rule, endpoint=name, view_func=func, methods=list(methods)
            )
            return func

        return decorator


class KeytrioApp(QuartTrio):
    """QuartTrio with keytrio's conventions; build it with :func:`make_app`."""

    api_versions: tuple[str, ...]
    api: ApiRoutes
    public_endpoints: set[str]
    public_paths: tuple[str, ...]
    require_client_cert: bool
    require_client_eku: bool
    trusted_ca_fingerprints: frozenset[bytes]
    trusted_cas: list[x509.Certificate]
    #: limit name -> (bytes, option that sets it); endpoint -> its (bytes, option)
    body_limits: dict[str, tuple[int, str]]
    endpoint_body_limits: dict[str, tuple[int, str]]
    default_body_limit: tuple[int, str]
    fast_routes: FastRoutes

    def body_limit_for(self, scope: Mapping[str, Any]) -> tuple[int, str]:
        """(largest body, option that raises it) of the route ``scope`` asks for."""
        fast = self.fast_routes.match(scope)  # type: ignore[arg-type]
        if fast is not None:
            return fast.body_limit
        try:
            adapter = self.url_map.bind("localhost", path_info="/")
            endpoint, _ = adapter.match(scope.get("path") or "/", method=scope.get("method") or "GET")
        except (HTTPException, RoutingException):
            return self.default_body_limit  # 404/405 and redirects: answered without the body
        return self.endpoint_body_limits.get(endpoint, self.default_body_limit)


def make_app(
    name: str,
    *,
    versions: tuple[str, ...],
    public_routes: Iterable[str] = ("/version",),
    require_client_cert: bool,
    trusted_client_ca: Iterable[str | os.PathLike[str]] = (),
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE,
    body_limits: Mapping[str, tuple[int, str]] | None = None,
    version_payload: dict[str, Any] | None = None,
    require_client_eku: bool = False,
) -> KeytrioApp:
    """A :class:`KeytrioApp` named ``name``.

    * ``versions``: the API versions served (e.g. protocol.versions.SERVER_VERSIONS).
    * ``public_routes``: unversioned paths served without a client cert; an entry ending in
      ``/*`` is a prefix (``"/verify/*"``). Matched against the path without its version prefix.
    * ``require_client_cert``: non-public routes need a client cert chaining to one of
      ``trusted_client_ca`` (PEM files, usually the server-components CA), else 403.
      False for a plain-HTTP app (the registrar's agent port).
    * ``require_client_eku``: refuse client certs without an extended key usage too (those whose
      EKU lacks clientAuth are always refused); may also be set on the app after it is built.
    * ``max_upload_size``: the body limit of every route without a ``body_limit`` of its own;
      ``body_limits``: name -> (bytes, option name) for routes that need more (or less).
    * ``version_payload``: if given, ``GET /version`` (unversioned, public) answers it.
    """
    if not versions:
        raise ValueError("versions must not be empty")
    app = KeytrioApp(name)
    app.api_versions = tuple(versions)
    app.public_endpoints = set()
    app.public_paths = tuple(public_routes)
    app.require_client_cert = require_client_cert
    app.require_client_eku = require_client_eku
    app.trusted_cas = _load_cas(trusted_client_ca)
    if require_client_cert and not app.trusted_cas:
        raise ValueError("require_client_cert needs trusted_client_ca")
    app.trusted_ca_fingerprints = frozenset(hashlib.sha256(_der(ca)).digest() for ca in app.trusted_cas)
    app.default_body_limit = (max_upload_size, "max_upload_size")
    app.body_limits = dict(body_limits or {})
    app.endpoint_body_limits = {}
    # BodyLimit enforces the per-route limit before quart reads anything; quart's own check is
    # only a backstop at the largest of them
    app.config["MAX_CONTENT_LENGTH"] = max([max_upload_size, *(n for n, _ in app.body_limits.values())])
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.url_map.converters["apiversion"] = _VersionConverter
    app.url_map.strict_slashes = False
    # no redirects: werkzeug answers "/agents//x" with an HTML 308 to "/agents/x" otherwise
    app.url_map.merge_slashes = False
    app.api = ApiRoutes(app)
    app.fast_routes = FastRoutes(app.asgi_app)
    app.asgi_app = BodyLimit(  # type: ignore[method-assign]
        app.fast_routes, max_size=max_upload_size, limit_for=app.body_limit_for
    )

    app.before_request(_before_request)
    app.register_error_handler(ApiError, _on_api_error)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(Exception, _on_exception)

    if version_payload is not None:
        payload = dict(version_payload)

        @app.route("/version", methods=["GET"])
        async def version() -> Response:
            return ok(payload)

        app.public_endpoints.add("version")
    openapi.install(app, title=name, version=__version__)  # GET /openapi.json (client cert as the API)
    return app


async def _before_request() -> None:
    app = _current_app()
    # 1. authorisation first: an unauthenticated client learns nothing about routes or versions
    if app.require_client_cert and not _is_public(app):
        if not _has_trusted_client_cert(app):
            raise ApiError(403, "Forbidden: a client certificate from the trusted CA is required")
        refused = _wrong_purpose(app)
        if refused is not None:
            raise ApiError(403, f"Forbidden: {refused}")
    # 2. the API version of a versioned route
    view_args = request.view_args
    if view_args is not None and "api_version" in view_args:
        version = view_args.pop("api_version")
        if version not in app.api_versions:
            raise ApiError(400, f"{UNSUPPORTED_VERSION_STATUS}: {version}")
        if version not in app.api.endpoint_versions.get(request.endpoint or "", app.api_versions):
            raise ApiError(404, "Not Found")
        g.api_version = version


def _current_app() -> KeytrioApp:
    return current_app._get_current_object()  # type: ignore[no-any-return]


def _is_public(app: KeytrioApp) -> bool:
    if request.endpoint is not None and request.endpoint in app.public_endpoints:
        return True
    path = request.path
    m = _VERSION_PREFIX.match(path)
    if m:
        path = m.group(2) or "/"
    for entry in app.public_paths:
        if entry.endswith("/*"):
            if path.startswith(entry[:-1]):
                return True
        elif path.rstrip("/") == entry.rstrip("/"):
            return True
    return False


def _has_trusted_client_cert(app: KeytrioApp) -> bool:
    chain = client_chain_der()
    if chain:
        # serve.py reports the chain OpenSSL verified during the handshake (leaf first); the
        # TLS layer may trust more CAs than this app, so look for one of ours in it.
        return any(hashlib.sha256(der).digest() in app.trusted_ca_fingerprints for der in chain)
    leaf = client_cert_der()
    if leaf is None:
        return False
    # No verified chain available: accept a leaf directly signed by one of our CAs.
    try:
        cert = x509.load_der_x509_certificate(leaf)
    except ValueError:
        return False
    for ca in app.trusted_cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return True
    return False


def _wrong_purpose(app: KeytrioApp) -> str | None:
    """Why the (trusted) client cert may not log in, or None. OpenSSL's handshake already
    refuses an EKU without clientAuth; this repeats it and adds ``require_client_eku``."""
    leaf = client_cert_der()
    if leaf is None:
        return "a client certificate from the trusted CA is required"
    return _purpose_of(leaf, app.require_client_eku)


@functools.lru_cache(maxsize=256)
def _purpose_of(leaf: bytes, require_eku: bool) -> str | None:
    # a few clients present the same certificate on every request: parse each once (bounded)
    try:
        cert = x509.load_der_x509_certificate(leaf)
    except ValueError:
        return "the client certificate does not parse"
    return client_cert_purpose(cert, require_eku=require_eku)


async def _on_api_error(error: ApiError) -> Response:
    return json_response(error.code, error.results, error.status)


async def _on_http_exception(error: HTTPException) -> Response:
    code = error.code or 500
    response = json_response(code)
    if isinstance(error, MethodNotAllowed):
        for name, value in error.get_headers():
            if name.lower() == "allow":
                response.headers["Allow"] = value
    if code == 404:
        # A well-formed version prefix that we do not serve: tell the client to renegotiate.
        m = _VERSION_PREFIX.match(request.path)
        app = _current_app()
        if m and m.group(1) not in app.api_versions:
            return json_response(400, None, f"{UNSUPPORTED_VERSION_STATUS}: {m.group(1)}")
    return response


async def _on_exception(error: Exception) -> Response:
    # The traceback goes to our log; the client gets no exception text (it might hold secrets).
    log.error(
        "unhandled error in %s %s",
        request.method,
        request.path,
        exc_info=(type(error), error, error.__traceback__),
    )
    return json_response(500)


def _load_cas(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    cas: list[x509.Certificate] = []
    for path in paths:
        with open(path, "rb") as fh:
            cas.extend(x509.load_pem_x509_certificates(fh.read()))
    return cas


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)
