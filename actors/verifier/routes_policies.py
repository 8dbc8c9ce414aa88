"""The verifier's policy routes: runtime policies (``/allowlists/``) and measured-boot policies
(``/mbpolicies/``), both served by one CRUD shape (:func:`install_crud`).

``GET /v2.x/allowlists/`` (``{"runtimepolicy names": [...]}``) and ``POST|PUT|GET|DELETE
/v2.x/allowlists/{name}`` (body ``runtime_policy`` b64, ``runtime_policy_key``, ``tpm_policy``);
``GET /v2.x/mbpolicies/`` and ``POST|PUT|GET|DELETE /v2.x/mbpolicies/{name}`` (body ``mb_policy``,
upstream's wire shapes: mbpolicies.py). Upstream's answers: POST/PUT 201, GET the record
(allowlists: ``{"name", "tmp_policy": null, "runtime_policy": <JSON text>}``), DELETE 204 without
a body (also at ``/allowlist/{name}``, the path upstream's v2.5 document spells); a bad policy ->
400 whose status names the JSON path, also in ``results.field``; 409 on POST of an existing name
and on DELETE of a name an agent uses; 404 for an unknown name.

Also here: resolving an enrolment's policies against the stores (:func:`enrol_policies`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quart import Response

from keytrio.actors.common.app import ApiError, KeytrioApp, bad_request, json_body, json_response, ok
from keytrio.actors.verifier.enrolment import tpm_policy_text
from keytrio.actors.verifier.mbpolicies import MbPolicyStore, resolve_enrolment
from keytrio.actors.verifier.mbpolicies import canonical as canonical_mb
from keytrio.actors.verifier.policies import (
    NameExists,
    NameInUse,
    NameUnknown,
    PolicyRefused,
    PolicyStore,
    decode_policy_b64,
)
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.mb_policy import is_empty as mb_policy_is_empty

_POLICY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,254}$")  # MAX_NAME


@dataclass(frozen=True)
class PolicyResource:
    """What one kind of named policy differs in; :func:`install_crud` serves the rest.

    ``save``, ``record`` and ``delete`` raise the stores' NameExists / NameUnknown / NameInUse /
    PolicyRefused (or an ApiError); the CRUD shape turns them into upstream's answers.
    """

    path: str  #: "/allowlists"
    title: str  #: "Runtime", the start of every status text
    kind: str  #: "runtime", in the bad-name 400
    names_key: str  #: the list's results key
    in_use: str  #: what a refused DELETE calls the policy ("allowlist")
    unknown_on_put: tuple[int, str]  #: (code, status after the name) of a PUT to an unknown name
    #: operation ("list", "add", "update", "get", "delete", "delete_alias") -> endpoint name
    endpoints: dict[str, str]
    names: Callable[[], Awaitable[list[str]]]
    save: Callable[[str, dict[str, Any], bool], Awaitable[None]]  #: (name, body, create)
    record: Callable[[str], Awaitable[dict[str, Any] | None]]  #: the GET results, None if unknown
    delete: Callable[[str], Awaitable[None]]
    alias: str | None = None  #: a second DELETE path


def install_crud(app: KeytrioApp, res: PolicyResource) -> None:
    """Serve list, POST (add), PUT (update), GET and DELETE of ``res`` on ``app``."""
    title, ep = res.title, res.endpoints

    async def list_names() -> Response:
        return ok({res.names_key: await res.names()})

    async def save(name: str, create: bool) -> Response:
        name = policy_name(name, res.kind)
        doc = await json_body()
        try:
            await res.save(name, doc, create)
        except PolicyRefused as exc:
            raise policy_refused(exc) from None
        except NameExists:
            raise ApiError(409, f"{title} policy with name {name} already exists") from None
        except NameUnknown:
            code, status = res.unknown_on_put
            raise ApiError(code, f"{title} policy with name {name} {status}") from None
        return json_response(201)  # upstream: 201 "Created" for POST and PUT

    async def add(name: str) -> Response:
        return await save(name, True)

    async def update(name: str) -> Response:
        return await save(name, False)

    async def get(name: str) -> Response:
        name = policy_name(name, res.kind)
        found = await res.record(name)
        if found is None:
            raise ApiError(404, f"{title} policy {name} not found")
        return ok(found)

    async def delete(name: str) -> Response:
        name = policy_name(name, res.kind)
        try:
            await res.delete(name)
        except NameUnknown:
            raise ApiError(404, f"{title} policy {name} not found") from None
        except NameInUse as exc:
            raise ApiError(409, f"Can't delete {res.in_use} as it's currently in use by agent {_users(exc.agent_ids)}") \
                from None
        return Response(b"", status=204, mimetype="application/json")  # upstream: 204, no body

    app.api.route(res.path + "/", methods=("GET",), endpoint=ep["list"])(list_names)
    one = res.path + "/<name>"
    app.api.route(one, methods=("POST",), body_limit="policy", endpoint=ep["add"])(add)
    app.api.route(one, methods=("PUT",), body_limit="policy", endpoint=ep["update"])(update)
    app.api.route(one, methods=("GET",), endpoint=ep["get"])(get)
    app.api.route(one, methods=("DELETE",), endpoint=ep["delete"])(delete)
    if res.alias is not None:
        app.api.route(res.alias, methods=("DELETE",), endpoint=ep["delete_alias"])(delete)


def install(app: KeytrioApp, pstore: PolicyStore, mstore: MbPolicyStore) -> None:
    """The runtime and measured-boot policy routes."""
    install_crud(app, runtime_resource(pstore))
    install_crud(app, mb_resource(mstore))


# --- the two kinds -----------------------------------------------------------------------------------


def runtime_resource(pstore: PolicyStore) -> PolicyResource:
    async def names() -> list[str]:
        return pstore.names()

    async def save(name: str, doc: dict[str, Any], create: bool) -> None:
        raw, key, tpm_policy = _policy_body(doc)
        policy = await pstore.accept(raw, key)
        await pstore.save_named(name, raw, policy, key, tpm_policy, create=create)

    async def record(name: str) -> dict[str, Any] | None:
        found = await pstore.get_named(name)
        if found is None:
            return None
        named, text = found
        # upstream's record: the policy as uploaded (JSON text), and "tmp_policy" (sic), which its
        # verifier reads from a column that does not exist: always null
        return {"name": named.name, "tmp_policy": None, "runtime_policy": text}

    return PolicyResource(
        path="/allowlists", title="Runtime", kind="runtime", names_key="runtimepolicy names",
        in_use="allowlist", unknown_on_put=(404, "does not already exist, use POST to create"),
        endpoints={"list": "list_policies", "add": "add_policy", "update": "update_policy",
                   "get": "get_policy", "delete": "delete_policy_route", "delete_alias": "delete_policy_alias"},
        names=names, save=save, record=record, delete=pstore.delete_named,
        alias="/allowlist/<name>",
    )


def mb_resource(mstore: MbPolicyStore) -> PolicyResource:
    async def save(name: str, doc: dict[str, Any], create: bool) -> None:
        text = canonical_mb(doc.get("mb_policy"))
        if text is None and _is_empty_mb(doc.get("mb_policy")):
            text = "{}"  # upstream stores the empty policy; an agent enrolled with it is not checked
        if text is None:
            raise ApiError(400, "Bad request: mb_policy: a policy is required",
                           {"field": "mb_policy", "reason": "a policy is required"})
        await mstore.save(name, text, create=create)

    async def record(name: str) -> dict[str, Any] | None:
        text = await mstore.get(name)
        return None if text is None else {"name": name, "mb_policy": text}

    return PolicyResource(
        path="/mbpolicies", title="Measured boot", kind="measured boot", names_key="mbpolicy names",
        in_use="mb_policy", unknown_on_put=(409, "does not already exist"),
        endpoints={"list": "list_mb_policies", "add": "add_mb_policy", "update": "update_mb_policy",
                   "get": "get_mb_policy", "delete": "delete_mb_policy"},
        names=mstore.names, save=save, record=record, delete=mstore.delete,
    )


# --- enrolment ---------------------------------------------------------------------------------------


async def enrol_policies(pstore: PolicyStore, mstore: MbPolicyStore, values: dict[str, Any]) -> None:
    """Resolve (and store) the measured-boot and runtime policies of an enrolment's ``values``."""
    await _enrol_mb_policy(mstore, values)
    await _enrol_policy(pstore, values)


async def _enrol_mb_policy(mstore: MbPolicyStore, values: dict[str, Any]) -> None:
    """Resolve the enrolment's measured-boot policy (inline ``mb_policy`` and/or ``mb_policy_name``)."""
    name = values.get("mb_policy_name") or None
    if name is not None:
        policy_name(name, "measured boot")
    try:
        await resolve_enrolment(mstore, values)
    except PolicyRefused as exc:
        raise policy_refused(exc) from None
    except NameExists:
        raise ApiError(409, f"Measured boot policy {name} already exists with different content") from None
    except NameUnknown:
        raise ApiError(404, f"Measured boot policy {name} not found") from None


async def _enrol_policy(pstore: PolicyStore, values: dict[str, Any]) -> None:
    """Resolve/store the enrolment's runtime policy; sets runtime_policy_checksum (or none)."""
    name = values.get("runtime_policy_name") or None
    key = values.get("runtime_policy_key") or None
    if name is not None:
        name = policy_name(name)
    # upstream's tenant sends "" for "no name": store NULL, or the policy's reference count misses it
    values["runtime_policy_name"] = name
    try:
        raw = decode_policy_b64(values.get("runtime_policy"))
        values["runtime_policy"] = ""  # one stored copy: the policy table, not the agent row
        if raw:
            policy = await pstore.accept(raw, key)
            if policy.is_empty:  # "{}": no runtime policy (PCR 10 not checked)
                values["runtime_policy_name"] = None
                return
            await pstore.store_inline(raw, policy, key, name)
            values["runtime_policy_checksum"] = policy.checksum
        elif name is not None:
            await pstore.ensure(name, None)  # uploaded through another worker / instance: read it
            policy = pstore.by_name(name)
            if policy is None:
                raise ApiError(404, f"Runtime policy {name} not found")
            values["runtime_policy_checksum"] = policy.checksum
    except PolicyRefused as exc:
        raise policy_refused(exc) from None
    except NameExists:
        raise ApiError(409, f"Runtime policy {name} already exists with different content") from None


# --- shared pieces -----------------------------------------------------------------------------------


def policy_name(raw: str, kind: str = "runtime") -> str:
    """``raw`` if it is a valid policy name, else a 400."""
    if not _POLICY_NAME.fullmatch(raw):
        raise ApiError(400, f"Bad request: {kind} policy name must be 1-255 of [A-Za-z0-9._:@+-]")
    return raw


def policy_refused(exc: PolicyRefused) -> ApiError:
    """The 400 of a refused policy: the status names the JSON path, also in ``results.field``."""
    return ApiError(400, f"Bad request: {exc.field}: {exc.reason}", {"field": exc.field, "reason": exc.reason})


def _is_empty_mb(value: object) -> bool:
    if isinstance(value, dict):
        return not value
    return isinstance(value, str) and value.strip() not in ("", "null") and mb_policy_is_empty(value)


def _users(agent_ids: list[str]) -> str:
    """Upstream names the one agent using a policy (and answers 500 when there are several)."""
    more = len(agent_ids) - 1
    return agent_ids[0] + (f" (and {more} more)" if more > 0 else "")


def _policy_body(doc: dict[str, Any]) -> tuple[bytes, str | None, str | None]:
    """(policy bytes, runtime_policy_key, tpm_policy text) of an allowlists POST/PUT body."""
    try:
        if doc.get("runtime_policy_sig"):
            raise ValidationError("runtime_policy_sig",
                                  "detached signatures are not supported: upload a DSSE envelope")
        key = doc.get("runtime_policy_key")
        if key is not None and not isinstance(key, str):
            raise ValidationError("runtime_policy_key", "must be a string")
        tpm_policy = doc.get("tpm_policy")
        tpm_text = tpm_policy_text(tpm_policy) if tpm_policy not in (None, "") else None
    except ProtocolError as exc:
        raise bad_request(exc) from None
    try:
        raw = decode_policy_b64(doc.get("runtime_policy"))
    except PolicyRefused as exc:
        raise policy_refused(exc) from None
    if not raw:
        raise ApiError(400, "Bad request: runtime_policy: a policy is required",
                       {"field": "runtime_policy", "reason": "a policy is required"})
    return raw, key or None, tpm_text
