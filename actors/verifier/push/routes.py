"""The v3.0 routes on the verifier's app, at ``/v3/...`` and ``/v3.0/...`` (upstream's agent uses /v3).

Every route is public at the TLS layer (a push agent has no client certificate); each one
authenticates itself: sessions need nothing, attestation POST/PATCH need the agent's own bearer
token, the GETs accept admin mTLS (a client cert from ``trusted_client_ca``) or the agent's own
token (upstream's docs; its code allows admins only). Every refusal, including the framework's
(403 without a route, 404, 405, 413, 500 on these paths: actors/common/v3errors.py), is a JSON:API error document ``{"errors": [{"status", "title",
"detail"}]}``; 429 and 503 carry ``Retry-After``. Bad input stores nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from quart import Response, current_app, request

from keytrio.actors.common.app import ApiError, KeytrioApp, client_chain_der, json_body
from keytrio.actors.common.tls import client_cert_purpose
from keytrio.actors.common.v3errors import V3Errors
from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.push.attestations import evidence_items, parse_index, retry_after
from keytrio.actors.verifier.push.fast import FastCycle
from keytrio.actors.verifier.push.service import PushService
from keytrio.protocol import push_wire
from keytrio.protocol.push_wire import WireError

PREFIXES = ("/v3", "/v3.0")
_MIMETYPE = "application/json"


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc), status=status, mimetype=_MIMETYPE, headers=headers or {})


def error_response(status: int, detail: str, code: str | None = None, retry: int | None = None) -> Response:
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return _json(status, push_wire.error_document(status, detail, code), headers)


def _prefix() -> str:
    return "/v3.0" if request.path.startswith("/v3.0/") else "/v3"


def jsonapi(view: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Refusals as JSON:API errors (WireError from our code, ApiError from json_body)."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await view(*args, **kwargs)
        except WireError as exc:
            return error_response(exc.status, exc.detail, exc.code, exc.retry_after)
        except ApiError as exc:
            return error_response(exc.code, exc.status)

    return wrapper


async def version_root() -> Response:
    """``GET /v3[.0]/``: the probe the v3.0 docs define, ``{"code": 200, "status": "Success",
    "results": {}}``; public, since an agent probes before it has any credential."""
    return _json(200, {"code": 200, "status": "Success", "results": {}})


def is_admin() -> bool:
    """A client cert chaining to one of the app's trusted client CAs, fit to act as a client."""
    app: KeytrioApp = current_app._get_current_object()  # type: ignore[attr-defined]
    chain = client_chain_der()
    if not chain or not any(hashlib.sha256(der).digest() in app.trusted_ca_fingerprints for der in chain):
        return False
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
    except ValueError:
        return False
    return client_cert_purpose(leaf, require_eku=app.require_client_eku) is None


def _agent_id(raw: str) -> str:
    return push_wire.agent_id_of(raw, "agent_id")


async def _body(*, surrogates: bool = False) -> dict[str, Any]:
    return await json_body(allow_surrogates=surrogates)


async def _body_or_error(*, surrogates: bool = False) -> dict[str, Any] | WireError:
    """The JSON body, or its refusal: the attestation cycle answers it only after the token and
    enrolment checks (which run in its transaction), as when they ran before the body was read."""
    try:
        return await _body(surrogates=surrogates)
    except ApiError as exc:
        return WireError(exc.code, exc.status)


def resource_document(res: dict[str, Any], prefix: str, *, meta: dict[str, Any] | None = None,
                      full: bool = True) -> dict[str, Any]:
    res = {**res, "evidence": evidence_items(res) if full else []}
    return push_wire.attestation_document(res, prefix, meta=meta)


class Cycle:
    """The two requests of the attestation cycle, served the same way by the quart routes and
    by :class:`~actors.verifier.push.fast.FastCycle` (which skips quart's request machinery)."""

    def __init__(self, push: PushService) -> None:
        self.push = push

    async def capabilities(self, prefix: str, agent_id: str, authorization: str | None,
                           doc: object | WireError) -> tuple[int, dict[str, Any], dict[str, str]]:
        aid = _agent_id(agent_id)
        admit = self.push.admit(authorization, aid, "submit_attestation")
        res = await self.push.attestations.create(admit, doc)
        location = f"{prefix}/agents/{aid}/attestations/{res['index']}"
        return 201, resource_document(res, prefix, full=False), {"Location": location}

    async def evidence(self, prefix: str, agent_id: str, which: str, authorization: str | None,
                       doc: object | WireError) -> tuple[int, dict[str, Any], dict[str, str]]:
        aid = _agent_id(agent_id)
        admit = self.push.admit(authorization, aid, "submit_evidence")
        accepted = await self.push.attestations.submit(admit, which, doc)
        self.push.evidence_accepted(accepted)
        res = accepted.res
        meta = {"seconds_to_next_attestation": retry_after(self.push.settings.quote_interval)}
        location = f"{prefix}/agents/{aid}/attestations/{res['index']}"
        return 202, resource_document(res, prefix, meta=meta), {"Location": location}


def register(app: KeytrioApp, push: PushService) -> None:
    """Add the v3.0 routes to the verifier's ``app`` (served by ``push``)."""
    cycle = Cycle(push)

    def resource(res: dict[str, Any], *, meta: dict[str, Any] | None = None, full: bool = True) -> dict[str, Any]:
        return resource_document(res, _prefix(), meta=meta, full=full)

    @jsonapi
    async def create_session() -> Response:
        """Open a PoP session: a challenge for the agent's AK (public)."""
        return _json(200, await push.sessions.create(await _body()))

    @jsonapi
    async def prove_session(session_id: str) -> Response:
        """Answer a session's challenge with TPM2_Certify of the AK; a bearer token when it holds."""
        status, doc = await push.sessions.prove(session_id, await _body())
        return _json(status, doc)

    @jsonapi
    async def create_attestation(agent_id: str) -> Response:
        """Phase 1: the agent's capabilities -> the evidence requested and its challenge."""
        status, doc, headers = await cycle.capabilities(
            _prefix(), agent_id, request.headers.get("Authorization"), await _body_or_error())
        return _json(status, doc, headers)

    @jsonapi
    async def submit_evidence(agent_id: str, which: str) -> Response:
        """Phase 2: evidence for the latest attestation -> 202 (a steady-state cycle's pass is
        written before it; anything else is verified asynchronously)."""
        status, doc, headers = await cycle.evidence(
            _prefix(), agent_id, which, request.headers.get("Authorization"),
            await _body_or_error(surrogates=True))
        return _json(status, doc, headers)

    async def reader(agent_id: str, action: str) -> str:
        aid = _agent_id(agent_id)
        if not is_admin():
            await push.sessions.authenticate(request.headers.get("Authorization"), aid, action)
        await push.push_agent(aid)
        return aid

    @jsonapi
    async def list_attestations(agent_id: str) -> Response:
        """The agent's attestation history, newest first (admin mTLS or the agent's own token)."""
        aid = await reader(agent_id, "list_attestations")
        rows = await pstore.list_attestations(push.store, aid)
        items = [resource(r, full=False)["data"] for r in rows]
        return _json(200, {"data": items, "jsonapi": dict(push_wire.JSONAPI)})

    @jsonapi
    async def get_attestation(agent_id: str, which: str) -> Response:
        """One attestation (``latest`` or an index): stage, evaluation, failure reason, evidence."""
        aid = await reader(agent_id, "read_attestation")
        if which == "latest":
            res = await pstore.latest(push.store, aid)
        else:
            res = await pstore.get_attestation(push.store, aid, parse_index(which))
        if res is None:
            raise WireError(404, "attestation not found")
        return _json(200, resource(res))

    routes: list[tuple[str, str, Callable[..., Any], str | None]] = [
        ("/sessions", "POST", create_session, None),
        ("/sessions/<session_id>", "PATCH", prove_session, None),
        ("/agents/<agent_id>/attestations", "POST", create_attestation, None),
        ("/agents/<agent_id>/attestations/<which>", "PATCH", submit_evidence, "evidence"),
        ("/agents/<agent_id>/attestations", "GET", list_attestations, None),
        ("/agents/<agent_id>/attestations/<which>", "GET", get_attestation, None),
    ]
    for prefix in PREFIXES:
        tag = prefix.strip("/").replace(".", "_")
        # the version root: 200 says "v3.0 served here" (upstream's answers 500; its clients then
        # fall back to v2.x, so a working root only helps them)
        app.add_url_rule(prefix + "/", endpoint=f"push_version_root_{tag}", view_func=version_root,
                         methods=["GET"])
        app.public_endpoints.add(f"push_version_root_{tag}")
        for rule, method, view, limit in routes:
            endpoint = f"push_{view.__name__}_{tag}"
            app.add_url_rule(prefix + rule, endpoint=endpoint, view_func=view, methods=[method])
            app.public_endpoints.add(endpoint)
            if limit is not None:
                app.endpoint_body_limits[endpoint] = app.body_limits[limit]
    # the cycle's two requests skip quart (inside BodyLimit: their bodies arrive whole, bounded)
    fast = FastCycle(app.fast_routes.app, cycle, (app.default_body_limit[0], app.body_limits["evidence"][0]))
    app.fast_routes.app = fast
    app.fast_routes.lean.append(fast)  # and serve.py's lean path hands whole small ones straight here
    # the app's own refusals on /v3 paths (client cert, 404, 405, 413, 500) as JSON:API errors
    app.asgi_app = V3Errors(app.asgi_app)  # type: ignore[method-assign]
