"""``GET /openapi.json``: each server's OpenAPI 3.1 document, generated from its real route map.

The document is built once, on first request, from ``app.url_map`` (so it lists exactly the
routes the app serves, nothing more): werkzeug's ``<converter:name>`` parts become ``{name}``
path parameters, ``/v<apiversion:api_version>/...`` becomes ``/v{api_version}/...`` with the
versions the route serves as an enum. Every operation has a summary: the view function's
docstring's first line, else the entry of :data:`SUMMARIES` (app name -> endpoint -> text).
Authentication follows the app: routes that need a client certificate say so (``mutualTLS``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from quart import Response

#: endpoint summaries per app (make_app's name) for routes whose view has no docstring
SUMMARIES: dict[str, dict[str, str]] = {
    "keytrio-verifier": {
        "add_agent": "Enrol an agent for continuous attestation",
        "get_agent": "Show an enrolled agent's state and attestation progress",
        "list_agents": "List the enrolled agents (optionally of one verifier id)",
        "delete_agent": "Stop attesting an agent and remove it",
        "stop_agent": "Stop attesting an agent, keeping its record",
        "reactivate_agent": "Resume attesting a stopped or failed agent",
        "list_policies": "List the named runtime (IMA) policies",
        "add_policy": "Store a new named runtime policy",
        "update_policy": "Replace a named runtime policy",
        "get_policy": "Show a named runtime policy",
        "delete_policy_route": "Delete a named runtime policy",
        "delete_policy_alias": "Delete a named runtime policy (the path upstream's v2.5 document spells)",
        "list_mb_policies": "List the named measured-boot policies",
        "add_mb_policy": "Store a new named measured-boot policy",
        "update_mb_policy": "Replace a named measured-boot policy",
        "get_mb_policy": "Show a named measured-boot policy",
        "delete_mb_policy": "Delete a named measured-boot policy",
        "verify_evidence": "Check submitted evidence (quote and logs) once, without enrolling",
        "verify_identity": "Check an identity quote of a TPM once, without enrolling",
    },
    "keytrio-registrar": {
        "list_agents": "List the registered agent ids",
        "get_agent": "Show a registered agent (EK, AK, EK certificate, contact address)",
        "delete_agent": "Remove an agent's registration",
    },
    "keytrio-registrar-agents": {
        "register": "Register an agent (EK, AK, EK certificate); answers the credential challenge",
        "activate": "Activate a registration with the answer to the credential challenge",
        "activate_put": "Activate a registration (the older path)",
    },
    "keytrio-agent": {
        "pubkey": "The agent's NK public key (the key U is encrypted to)",
        "identity_quote": "A TPM quote of PCRs over a nonce, with the NK and AK",
        "integrity_quote": "A TPM quote with the IMA and measured-boot logs for continuous attestation",
        "ukey": "Deliver U (the tenant's half of the bootstrap key)",
        "vkey": "Deliver V (the verifier's half of the bootstrap key)",
        "verify": "Prove the derived key K: HMAC of a challenge",
        "revocation_notice": "Deliver a signed revocation notice",
    },
}

_COMMON = {
    "version": "The API versions this server speaks",
    "openapi": "This OpenAPI document",
}
_PARAM = re.compile(r"<(?:(?P<conv>[a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>")
_ENVELOPE = {
    "type": "object",
    "required": ["code", "status", "results"],
    "properties": {"code": {"type": "integer"}, "status": {"type": "string"}, "results": {"type": "object"}},
}

_ENVELOPE_RESPONSE = {"default": {"description": "the JSON envelope {code, status, results}",
                                  "content": {"application/json": {"schema": _ENVELOPE}}}}
_OPENAPI_RESPONSE = {"200": {"description": "this document", "content": {"application/json": {}}}}


def summary(app: Any, endpoint: str) -> str | None:
    """The operation summary of ``endpoint``: docstring first line, else the table's entry."""
    view = app.view_functions.get(endpoint)
    doc = (getattr(view, "__doc__", None) or "").strip()
    if doc:
        return doc.splitlines()[0].strip()
    return SUMMARIES.get(app.name, {}).get(endpoint) or _COMMON.get(endpoint)


def _path(rule: str) -> tuple[str, list[tuple[str, str]]]:
    params: list[tuple[str, str]] = []

    def sub(m: re.Match[str]) -> str:
        params.append((m.group("name"), m.group("conv") or "default"))
        return "{" + m.group("name") + "}"

    return _PARAM.sub(sub, rule), params


def build(app: Any, *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s ``url_map``."""
    paths: dict[str, dict[str, Any]] = {}
    versions: dict[str, tuple[str, ...]] = getattr(getattr(app, "api", None), "endpoint_versions", {})
    public = getattr(app, "public_endpoints", set())
    needs_cert = bool(getattr(app, "require_client_cert", False))
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        if rule.endpoint == "static":
            continue
        path, params = _path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {
                "operationId": f"{rule.endpoint}_{method.lower()}",
                "summary": summary(app, rule.endpoint) or f"{method} {path}",
                "responses": _OPENAPI_RESPONSE if rule.endpoint == "openapi" else _ENVELOPE_RESPONSE,
            }
            if params:
                op["parameters"] = [_parameter(name, conv, versions.get(rule.endpoint)) for name, conv in params]
            if needs_cert and rule.endpoint not in public and not _public_path(app, rule.rule):
                op["security"] = [{"mutualTLS": []}]
            else:
                op["security"] = []
            paths.setdefault(path, {})[method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
    }
    if needs_cert:
        doc["components"] = {"securitySchemes": {"mutualTLS": {
            "type": "mutualTLS", "description": "a client certificate issued by a trusted_client_ca"}}}
    return doc


def _parameter(name: str, converter: str, versions: tuple[str, ...] | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if converter == "apiversion" and versions:
        schema["enum"] = list(versions)
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _public_path(app: Any, rule: str) -> bool:
    """The app's public path prefixes (``/verify/*``) matched against a versioned rule."""
    path = re.sub(r"^/v<[^>]+>", "", rule) or "/"
    for entry in getattr(app, "public_paths", ()):
        if entry.endswith("/*") and path.startswith(entry[:-1]):
            return True
        if path.rstrip("/") == entry.rstrip("/"):
            return True
    return False


def install(app: Any, *, title: str, version: str) -> None:
    """Serve ``GET /openapi.json`` on ``app`` (the document is built on first request, once every
    route is registered)."""
    cache: list[bytes] = []

    async def openapi() -> Response:
        """This OpenAPI document"""
        if not cache:
            cache.append(json.dumps(build(app, title=title, version=version), indent=1).encode())
        return Response(cache[0], status=200, mimetype="application/json")

    app.add_url_rule("/openapi.json", endpoint="openapi", view_func=openapi, methods=["GET"])
