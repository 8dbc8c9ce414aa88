"""The registrar's two HTTP apps over one :class:`RegistrarService`.

* agent app (plain HTTP, as upstream): ``POST /v2.x/agents/{id}`` registers;
  ``PUT|POST /v2.x/agents/{id}/activate`` and ``PUT /v2.x/agents/{id}`` activate;
  API v3.0 (upstream's rest_apis/3_0/registrar): ``POST /v3.0/agents/`` registers with the
  ``agent_id`` in the body, ``POST /v3.0/agents/{id}/activate`` activates; the v2 forms
  (``POST /agents/{id}``, ``PUT .../activate``, ``PUT /agents/{id}``) are gone from v3.0;
* admin app (HTTPS, client cert from ``trusted_client_ca`` on every route but ``/version`` and the
  v3.0 root): ``GET /v{2.x,3.0}/agents/``, ``GET|DELETE /v{2.x,3.0}/agents/{id}``.

Both answer ``GET /version`` (``current_version`` stays the newest 2.x, as upstream's does, and
``supported_versions`` adds "3.0") and ``GET /v3.0/`` (200, the version probe). Successes keep
the ``{"code","status","results"}`` envelope in v3.0 (as the v3.0 document shows); errors on
v3 paths are JSON:API error documents ``{"errors": [...]}`` (actors/common/v3errors.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from quart import Response, g, request

from keytrio.actors.common.app import (
    ApiError,
    KeytrioApp,
    json_body,
    json_response,
    make_app,
    ok,
    parse_agent_id,
)
from keytrio.actors.common.bodylimit import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.common.v3errors import V3Errors
from keytrio.actors.registrar.service import RegistrarService
from keytrio.protocol.versions import SERVER_VERSIONS, as_tuple, newest

#: the pull-model versions (the v2 routes) and the v3 ones, served side by side
V2_VERSIONS: tuple[str, ...] = tuple(v for v in SERVER_VERSIONS if as_tuple(v) < (3, 0))
V3_VERSIONS: tuple[str, ...] = ("3.0",)
VERSIONS: tuple[str, ...] = V2_VERSIONS + V3_VERSIONS


def version_payload() -> dict[str, object]:
    """``GET /version``: v3.0 is listed but not "current", so v2 clients that take the current
    version as is keep speaking v2 (upstream's registrar answers the same way)."""
    return {"current_version": newest(V2_VERSIONS), "supported_versions": list(VERSIONS)}


def _registrar_app(name: str, **kwargs: Any) -> KeytrioApp:
    app = make_app(name, versions=VERSIONS, version_payload=version_payload(), **kwargs)
    app.asgi_app = V3Errors(app.asgi_app)  # type: ignore[method-assign]

    async def version_root() -> Response:
        """Probe: 200 when this server speaks API v3.0"""
        return ok()

    v3_route(app, "/", version_root, methods=("GET",))
    app.public_endpoints.add("version_root")
    return app


def v3_route(app: KeytrioApp, rule: str, view: Callable[..., Any], *, methods: Iterable[str]) -> None:
    """Serve ``view`` at ``/v3.0{rule}`` only. A literal rule rather than app.api's versioned one:
    a v3-only URL that v2 never had (``/agents/`` on the agent port) must leave v2 answering as
    before (404, not a 405 for a method the v3 rule allows)."""
    for version in V3_VERSIONS:
        app.add_url_rule(f"/v{version}{rule}", endpoint=view.__name__, view_func=view, methods=list(methods))


def build_agent_app(
    service: RegistrarService, *, max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE
) -> KeytrioApp:
    app = _registrar_app(
        "keytrio-registrar-agents", require_client_cert=False, max_upload_size=max_upload_size
    )

    @app.api.route("/agents/<agent_id>", methods=("POST",), versions=V2_VERSIONS)
    async def register(agent_id: str) -> Response:
        parse_agent_id(agent_id)  # a bad id is reported as such, whatever the body
        doc = await json_body()
        blob = await service.register(agent_id, doc)
        return ok({"blob": blob})

    async def register_v3() -> Response:
        """Register an agent (agent_id in the body); answers the credential challenge"""
        doc = await json_body()
        raw_id = doc.get("agent_id")
        if not isinstance(raw_id, str):
            raise ApiError(400, "Bad request: agent_id is required (a string)")
        parse_agent_id(raw_id)
        blob = await service.register(raw_id, doc)  # a port as text ("9002") is fine, as in v2
        return ok({"blob": blob})

    v3_route(app, "/agents/", register_v3, methods=("POST",))

    async def activate(agent_id: str) -> Response:
        if g.api_version in V3_VERSIONS and request.method != "POST":
            # one URL rule serves both: v3.0 dropped the PUT form
            refused = json_response(405, None, "Method Not Allowed: API v3.0 activates with POST")
            refused.headers["Allow"] = "POST"
            return refused
        parse_agent_id(agent_id)
        doc = await json_body()
        await service.activate(agent_id, doc)
        return ok()

    app.api.route("/agents/<agent_id>/activate", methods=("PUT", "POST"), endpoint="activate")(activate)
    app.api.route(
        "/agents/<agent_id>", methods=("PUT",), endpoint="activate_put", versions=V2_VERSIONS
    )(activate)
    return app


def build_admin_app(
    service: RegistrarService,
    *,
    trusted_client_ca: Iterable[str | os.PathLike[str]],
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE,
) -> KeytrioApp:
    app = _registrar_app(
        "keytrio-registrar",
        require_client_cert=True,
        trusted_client_ca=trusted_client_ca,
        max_upload_size=max_upload_size,
    )

    @app.api.route("/agents/", methods=("GET",))
    async def list_agents() -> Response:
        return ok({"uuids": await service.list_ids()})

    @app.api.route("/agents/<agent_id>", methods=("GET",))
    async def get_agent(agent_id: str) -> Response:
        return ok(await service.get(agent_id))

    @app.api.route("/agents/<agent_id>", methods=("DELETE",))
    async def delete_agent(agent_id: str) -> Response:
        await service.delete(agent_id)
        return ok()

    return app
