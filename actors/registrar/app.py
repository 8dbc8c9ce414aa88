"""The registrar's two HTTP apps over one :class:`RegistrarService`.

* agent app (plain HTTP, as upstream): ``POST /v2.x/agents/{id}`` registers;
  ``PUT|POST /v2.x/agents/{id}/activate`` and ``PUT /v2.x/agents/{id}`` activate;
* admin app (HTTPS, client cert from ``trusted_client_ca`` on every route but ``/version``):
  ``GET /v2.x/agents/``, ``GET|DELETE /v2.x/agents/{id}``.

Both answer ``GET /version`` and serve every version of protocol.versions.SERVER_VERSIONS.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from quart import Response

from keytrio.actors.common.app import KeytrioApp, json_body, make_app, ok, parse_agent_id
from keytrio.actors.common.serve import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.registrar.service import RegistrarService
from keytrio.protocol.versions import SERVER_VERSIONS, server_version_payload


def build_agent_app(
    service: RegistrarService, *, max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE
) -> KeytrioApp:
    app = make_app(
        "keytrio-registrar-agents",
        versions=SERVER_VERSIONS,
        require_client_cert=False,
        max_upload_size=max_upload_size,
        version_payload=server_version_payload(),
    )

    @app.api.route("/agents/<agent_id>", methods=("POST",))
    async def register(agent_id: str) -> Response:
        parse_agent_id(agent_id)  # a bad id is reported as such, whatever the body
        doc = await json_body()
        blob = await service.register(agent_id, doc)
        return ok({"blob": blob})

    async def activate(agent_id: str) -> Response:
        parse_agent_id(agent_id)
        doc = await json_body()
        await service.activate(agent_id, doc)
        return ok()

    app.api.route("/agents/<agent_id>/activate", methods=("PUT", "POST"), endpoint="activate")(activate)
    app.api.route("/agents/<agent_id>", methods=("PUT",), endpoint="activate_put")(activate)
    return app


def build_admin_app(
    service: RegistrarService,
    *,
    trusted_client_ca: Iterable[str | os.PathLike[str]],
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE,
) -> KeytrioApp:
    app = make_app(
        "keytrio-registrar",
        versions=SERVER_VERSIONS,
        require_client_cert=True,
        trusted_client_ca=trusted_client_ca,
        max_upload_size=max_upload_size,
        version_payload=server_version_payload(),
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
