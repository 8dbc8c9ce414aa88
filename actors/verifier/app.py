"""The verifier's REST API (HTTPS; client cert from ``trusted_client_ca`` except on public routes).

``POST|GET|DELETE /v2.x/agents/{uuid}``, ``GET /v2.x/agents/?verifier=ID[&bulk]``,
``PUT /v2.x/agents/{uuid}/stop`` and ``…/reactivate``; runtime policies ``GET /v2.x/allowlists/``
(``{"runtimepolicy names": [...]}``) and ``POST|PUT|GET|DELETE /v2.x/allowlists/{name}`` (body
``runtime_policy`` b64, ``runtime_policy_key``, ``tpm_policy``; upstream's answers: POST/PUT 201,
GET ``{"name", "tmp_policy": null, "runtime_policy": <JSON text>}``, DELETE 204 without a body;
a bad policy -> 400 whose status names the JSON path, also in ``results.field``; 409 on POST of an
existing name and on DELETE of a name an agent uses; 404); public ``POST /v2.x/verify/evidence`` and ``GET /v2.x/verify/identity``
(evidence.py); measured-boot policies ``GET /v2.x/mbpolicies/`` and ``POST|PUT|GET|DELETE
/v2.x/mbpolicies/{name}`` (mbpolicies.py). Enrolment takes ``mb_policy`` (inline JSON text) and/or
``mb_policy_name`` (an inline one without a name is stored under the agent's id, as upstream
does), and ``runtime_policy_name`` (a stored policy, ``runtime_policy`` empty) or an inline
``runtime_policy`` (stored by checksum, and under ``runtime_policy_name`` when given); ``v`` may
be null (upstream's tenant without a payload: no V is delivered). The monitor is not started here: the
actor injects hooks (``on_enrolled`` …) that run after the store has committed the change.
A hook may be a plain function or a coroutine function taking the agent id.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import trio
from cryptography import x509
from quart import Response, g, request

from keytrio.actors.common.app import (
    ApiError,
    KeytrioApp,
    bad_request,
    json_body,
    json_response,
    make_app,
    ok,
    parse_agent_id,
)
from keytrio.actors.common.serve import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import evidence, records
from keytrio.actors.verifier.config import DEFAULT_MAX_EVIDENCE_SIZE, DEFAULT_MAX_POLICY_SIZE
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
from keytrio.protocol import safejson, tpm2, validation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.mb_policy import is_empty as mb_policy_is_empty
from keytrio.protocol.versions import SERVER_VERSIONS, server_version_payload

Hook = Callable[[str], Awaitable[None] | None]

#: Fields upstream's tenant always sends and upstream's verifier requires (PROTOCOL.md).
REQUIRED_FIELDS = (
    "v",
    "cloudagent_ip",
    "cloudagent_port",
    "tpm_policy",
    "runtime_policy",
    "runtime_policy_name",
    "runtime_policy_key",
    "mb_policy",
    "mb_policy_name",
    "ima_sign_verification_keys",
    "metadata",
    "revocation_key",
    "accept_tpm_hash_algs",
    "accept_tpm_encryption_algs",
    "accept_tpm_signing_algs",
    "ak_tpm",
    "mtls_cert",
    "supported_version",
)

_VERSION = re.compile(r"^\d{1,3}\.\d{1,3}$")
_ALG_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MAX_TEXT = 256 * 1024  # any single text field; the body limit bounds the total anyway
_POLICY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,254}$")  # MAX_NAME
MAX_INTERVAL_FACTOR = 5  # upstream's push_agent_monitor._TIMEOUT_MULTIPLIER
_FAILED_STATES = {records.FAILED, records.INVALID_QUOTE, records.TENANT_FAILED, records.TERMINATED}


# --- field validators (raise ValidationError) ------------------------------------------------------


def _text(doc: dict[str, Any], field: str, *, nullable: bool = True, max_len: int | None = _MAX_TEXT) -> str | None:
    value = doc[field]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string" + (" or null" if nullable else ""))
    if max_len is not None and len(value) > max_len:
        raise ValidationError(field, "is too long")
    return value


def _json_text(value: object, field: str) -> Any:
    """A JSON value sent as JSON text (what upstream's tenant does) or directly."""
    if isinstance(value, str):
        try:
            return safejson.loads(value)
        except safejson.JsonError as exc:
            raise ValidationError(field, f"is not valid JSON: {exc.reason}") from None
    return value


def _ip(value: object) -> str:
    return validation.host(value, "cloudagent_ip")


def _v(value: object) -> str | None:
    if value is None or value == "":
        return None  # upstream's tenant sends null without a payload: no V to deliver
    raw = validation.b64(value, "v")
    if len(raw) != 32:
        raise ValidationError("v", "must decode to 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def _tpm_policy(value: object) -> str:
    policy = validation.tpm_policy(_json_text(value, "tpm_policy"))
    return value if isinstance(value, str) else json.dumps(policy)


def _alg_list(value: object, field: str) -> list[str]:
    algs = _json_text(value, field)
    if not isinstance(algs, list) or not all(isinstance(a, str) and _ALG_NAME.fullmatch(a) for a in algs):
        raise ValidationError(field, "must be a list of algorithm names (or JSON text of one)")
    return algs


def _meta_data(value: object) -> str:
    meta = _json_text(value, "metadata")
    if not isinstance(meta, dict):
        raise ValidationError("metadata", "must be a JSON object (or JSON text of one)")
    return value if isinstance(value, str) else json.dumps(meta)


def _ak(value: object) -> tuple[str, str, str]:
    """(canonical base64 ak_tpm, enc_alg, sign_alg)."""
    raw = validation.b64(value, "ak_tpm", max_len=4096)
    try:
        pub = tpm2.parse_public(raw)
        tpm2.check_ak_attributes(pub)
        enc, sign, _ = tpm2.key_algorithms(pub)
    except ProtocolError as exc:
        reason = exc.reason if isinstance(exc, ValidationError) else str(exc)
        raise ValidationError("ak_tpm", f"is not a usable AK ({reason})") from None
    return base64.b64encode(tpm2.public_bytes(pub)).decode("ascii"), enc, sign


def _mtls_cert(value: object) -> str | None:
    if value is None or value == "disabled":  # upstream agents with mTLS off
        return None
    text = validation.pem(value, "mtls_cert", label="CERTIFICATE")
    try:
        x509.load_pem_x509_certificate(text.encode("ascii"))
    except ValueError:
        raise ValidationError("mtls_cert", "is not a valid X.509 certificate") from None
    return text


def _revocation_key(value: object) -> str | None:
    if value is None or value == "":
        return None
    return validation.pem(value, "revocation_key")


def parse_enrolment(agent_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``POST /agents/{id}`` body into column values (ApiError 400 naming the problem)."""
    missing = [f for f in REQUIRED_FIELDS if f not in doc]
    if missing:
        raise ApiError(400, "Bad request: missing required fields: " + ", ".join(missing))
    try:
        # an inline policy is as large as the machine's file list: bounded by max_policy_size
        runtime_policy = _text(doc, "runtime_policy", max_len=None) or ""
        validation.b64(runtime_policy, "runtime_policy", allow_empty=True)
        supported = doc["supported_version"]
        if not isinstance(supported, str) or not _VERSION.fullmatch(supported):
            raise ValidationError("supported_version", "must be a version like 2.1")
        ak_tpm, enc_alg, sign_alg = _ak(doc["ak_tpm"])
        keys = _text(doc, "ima_sign_verification_keys")
        if keys:
            _json_text(keys, "ima_sign_verification_keys")
        return {
            "agent_id": agent_id,
            "v": _v(doc["v"]),
            "ip": _ip(doc["cloudagent_ip"]),
            "port": validation.port(doc["cloudagent_port"], "cloudagent_port"),
            "tpm_policy": _tpm_policy(doc["tpm_policy"]),
            "runtime_policy": runtime_policy,
            "runtime_policy_name": _text(doc, "runtime_policy_name"),
            "runtime_policy_key": _text(doc, "runtime_policy_key"),
            "mb_policy": _text(doc, "mb_policy"),
            "mb_policy_name": _text(doc, "mb_policy_name"),
            "ima_sign_verification_keys": keys,
            "meta_data": _meta_data(doc["metadata"]),
            "revocation_key": _revocation_key(doc["revocation_key"]),
            "accept_tpm_hash_algs": json.dumps(_alg_list(doc["accept_tpm_hash_algs"], "accept_tpm_hash_algs")),
            "accept_tpm_encryption_algs": json.dumps(
                _alg_list(doc["accept_tpm_encryption_algs"], "accept_tpm_encryption_algs")
            ),
            "accept_tpm_signing_algs": json.dumps(
                _alg_list(doc["accept_tpm_signing_algs"], "accept_tpm_signing_algs")
            ),
            "ak_tpm": ak_tpm,
            "mtls_cert": _mtls_cert(doc["mtls_cert"]),
            "supported_version": supported,
            "enc_alg": enc_alg,
            "sign_alg": sign_alg,
        }
    except ProtocolError as exc:
        raise bad_request(exc) from None


# --- GET view ----------------------------------------------------------------------------------------


def agent_view(
    row: dict[str, Any], *, version: str, verifier_ip: str, verifier_port: int, quote_interval: float
) -> dict[str, Any]:
    """The status record of GET /agents/{id} for API ``version``."""
    mb = row["mb_policy"]
    view: dict[str, Any] = {
        "operational_state": row["operational_state"],
        "v": row["v"],
        "ip": row["ip"],
        "port": row["port"],
        "tpm_policy": row["tpm_policy"],
        "meta_data": row["meta_data"],
        "has_mb_refstate": 0 if mb in (None, "", "null") else 1,
        "has_runtime_policy": 1 if (row["runtime_policy"] or row.get("runtime_policy_checksum")
                                    or row.get("runtime_policy_name")) else 0,
        "accept_tpm_hash_algs": json.loads(row["accept_tpm_hash_algs"]),
        "accept_tpm_encryption_algs": json.loads(row["accept_tpm_encryption_algs"]),
        "accept_tpm_signing_algs": json.loads(row["accept_tpm_signing_algs"]),
        "hash_alg": row["hash_alg"],
        "enc_alg": row["enc_alg"],
        "sign_alg": row["sign_alg"],
        "verifier_id": row["verifier_id"],
        "verifier_ip": verifier_ip,
        "verifier_port": verifier_port,
        "severity_level": row["severity_level"],
        "last_event_id": row["last_event_id"],
        "attestation_count": row["attestation_count"],
        "last_received_quote": row["last_received_quote"],
        "last_successful_attestation": row["last_successful_attestation"],
        # keytrio: revocation notices still to be delivered TO this agent (notify.Outbox)
        "pending_notices": row.get("pending_notices", 0),
    }
    if tuple(int(p) for p in version.split(".")) >= (2, 5):
        if row["operational_state"] in _FAILED_STATES:
            status = "FAIL"
        elif row["attestation_count"] == 0:
            status = "PENDING"
        else:
            status = "PASS"
        view["attestation_status"] = status
        view["attestation_period"] = f"{quote_interval:g}s"
        # upstream: the time after which a push-mode agent counts as timed out, 5 quote intervals
        view["maximum_attestation_interval"] = f"{quote_interval * MAX_INTERVAL_FACTOR:g}s"
    return view


# --- the app -----------------------------------------------------------------------------------------


async def _call(hook: Hook | None, agent_id: str) -> None:
    if hook is None:
        return
    result = hook(agent_id)
    if inspect.isawaitable(result):
        await result


def build_app(
    store: Store,
    *,
    verifier_id: str,
    ip: str,
    port: int | Callable[[], int],
    trusted_client_ca: Iterable[str | os.PathLike[str]],
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE,
    max_evidence_size: int = DEFAULT_MAX_EVIDENCE_SIZE,
    max_policy_size: int = DEFAULT_MAX_POLICY_SIZE,
    quote_interval: float = 2.0,
    initial_state: int = records.GET_QUOTE,
    clock: Callable[[], float] = time.time,
    on_enrolled: Hook | None = None,
    on_deleted: Hook | None = None,
    on_stop: Hook | None = None,
    on_reactivate: Hook | None = None,
    policies: PolicyStore | None = None,
    ignore_tomtou_errors: bool = False,
    mbpolicies: MbPolicyStore | None = None,
) -> KeytrioApp:
    """The verifier's HTTPS app over ``store`` (verifier_ip/port are reported in GET records).

    ``port`` may be a callable: with ``port = 0`` the actor binds first and then knows its port.
    """
    app = make_app(
        "keytrio-verifier",
        versions=SERVER_VERSIONS,
        public_routes=("/version", "/verify/*"),
        require_client_cert=True,
        trusted_client_ca=trusted_client_ca,
        max_upload_size=max_upload_size,
        body_limits={
            "evidence": (max_evidence_size, "max_evidence_size"),
            "policy": (max_policy_size, "max_policy_size"),
        },
        version_payload=server_version_payload(),
    )

    pstore = policies if policies is not None else PolicyStore(store, clock=clock)
    mstore = mbpolicies if mbpolicies is not None else MbPolicyStore(store, clock=clock)

    def view(row: dict[str, Any]) -> dict[str, Any]:
        return agent_view(
            row, version=g.api_version, verifier_ip=ip, verifier_port=port() if callable(port) else port,
            quote_interval=quote_interval,
        )

    @app.api.route("/agents/<agent_id>", methods=("POST",), body_limit="policy")
    async def add_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        values = parse_enrolment(aid, await json_body())
        await _enrol_mb_policy(mstore, values)
        await _enrol_policy(pstore, values)
        values.update(
            operational_state=initial_state,
            verifier_id=verifier_id,
            enrolled_at=clock(),
            attestation_count=0,
            last_received_quote=0,
            last_successful_attestation=0,
        )
        try:
            await records.add(store, values)
        except records.DuplicateAgent:
            if not values.get("runtime_policy_name"):
                await pstore.agent_deleted(values.get("runtime_policy_checksum"))
            if values.get("mb_policy_name") == aid:
                await mstore.drop_unused(aid)  # kept if the enrolled agent of that id uses it
            raise ApiError(409, f"Agent of uuid {aid} already exists") from None
        await _call(on_enrolled, aid)
        return ok()

    @app.api.route("/agents/<agent_id>", methods=("GET",))
    async def get_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        row = await records.get(store, aid)
        if row is None:
            raise ApiError(404, f"Agent {aid} not found")
        row["pending_notices"] = (await records.pending_notices(store, [aid])).get(aid, 0)
        return ok(view(row))

    @app.api.route("/agents/", methods=("GET",))
    async def list_agents() -> Response:
        # upstream's tenant always sends ?verifier=, empty meaning "no filter"
        wanted = request.args.get("verifier") or None
        if "bulk" in request.args:
            rows = await records.list_all(store, wanted)
            pending = await records.pending_notices(store, [r["agent_id"] for r in rows])
            for row in rows:
                row["pending_notices"] = pending.get(row["agent_id"], 0)
            return ok({row["agent_id"]: view(row) for row in rows})
        return ok({"uuids": [[aid] for aid in await records.list_ids(store, wanted)]})

    @app.api.route("/agents/<agent_id>", methods=("DELETE",))
    async def delete_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        row = await records.get(store, aid)
        if row is None or not await records.delete(store, aid):
            raise ApiError(404, f"Agent {aid} not found")
        await _call(on_deleted, aid)
        if not row.get("runtime_policy_name"):
            await pstore.agent_deleted(row.get("runtime_policy_checksum"))
        if row.get("mb_policy_name") == aid:
            await mstore.drop_unused(aid)  # its inline measured-boot policy (upstream deletes it too)
        return ok()

    @app.api.route("/agents/<agent_id>/stop", methods=("PUT",))
    async def stop_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        if not await records.set_state(store, aid, records.TENANT_FAILED):
            raise ApiError(404, f"Agent {aid} not found")
        await _call(on_stop, aid)
        return ok()

    @app.api.route("/agents/<agent_id>/reactivate", methods=("PUT",))
    async def reactivate_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        if not await records.reactivate(store, aid):  # state + progress reset: one transaction
            raise ApiError(404, f"Agent {aid} not found")
        await _call(on_reactivate, aid)
        return ok()

    # --- runtime policies ------------------------------------------------------------------------

    @app.api.route("/allowlists/", methods=("GET",))
    async def list_policies() -> Response:
        return ok({"runtimepolicy names": pstore.names()})

    async def save(name: str, create: bool) -> Response:
        name = _policy_name(name)
        doc = await json_body()
        raw, key, tpm_policy = _policy_body(doc)
        try:
            policy = await pstore.accept(raw, key)
            await pstore.save_named(name, raw, policy, key, tpm_policy, create=create)
        except PolicyRefused as exc:
            raise _policy_refused(exc) from None
        except NameExists:
            raise ApiError(409, f"Runtime policy with name {name} already exists") from None
        except NameUnknown:
            raise ApiError(404, f"Runtime policy with name {name} does not already exist, use POST to create") \
                from None
        return json_response(201)  # upstream: 201 "Created" for POST and PUT

    @app.api.route("/allowlists/<name>", methods=("POST",), body_limit="policy")
    async def add_policy(name: str) -> Response:
        return await save(name, True)

    @app.api.route("/allowlists/<name>", methods=("PUT",), body_limit="policy")
    async def update_policy(name: str) -> Response:
        return await save(name, False)

    @app.api.route("/allowlists/<name>", methods=("GET",))
    async def get_policy(name: str) -> Response:
        name = _policy_name(name)
        found = await pstore.get_named(name)
        if found is None:
            raise ApiError(404, f"Runtime policy {name} not found")
        named, text = found
        # upstream's record: the policy as uploaded (JSON text), and "tmp_policy" (sic), which its
        # verifier reads from a column that does not exist: always null
        return ok({"name": named.name, "tmp_policy": None, "runtime_policy": text})

    async def delete_policy(name: str) -> Response:
        name = _policy_name(name)
        try:
            await pstore.delete_named(name)
        except NameUnknown:
            raise ApiError(404, f"Runtime policy {name} not found") from None
        except NameInUse as exc:
            raise ApiError(409, f"Can't delete allowlist as it's currently in use by agent {_users(exc.agent_ids)}") \
                from None
        return Response(b"", status=204, mimetype="application/json")  # upstream: 204, no body

    @app.api.route("/allowlists/<name>", methods=("DELETE",))
    async def delete_policy_route(name: str) -> Response:
        return await delete_policy(name)

    @app.api.route("/allowlist/<name>", methods=("DELETE",))
    async def delete_policy_alias(name: str) -> Response:  # the path upstream's v2.5 doc spells
        return await delete_policy(name)

    # --- measured-boot policies (upstream's wire shapes: mbpolicies.py) ---------------------------

    @app.api.route("/mbpolicies/", methods=("GET",))
    async def list_mb_policies() -> Response:
        return ok({"mbpolicy names": await mstore.names()})

    async def save_mb(name: str, create: bool) -> Response:
        name = _policy_name(name, "measured boot")
        doc = await json_body()
        try:
            text = canonical_mb(doc.get("mb_policy"))
            if text is None and _is_empty_mb(doc.get("mb_policy")):
                text = "{}"  # upstream stores the empty policy; an agent enrolled with it is not checked
        except PolicyRefused as exc:
            raise _policy_refused(exc) from None
        if text is None:
            raise ApiError(400, "Bad request: mb_policy: a policy is required",
                           {"field": "mb_policy", "reason": "a policy is required"})
        try:
            await mstore.save(name, text, create=create)
        except NameExists:
            raise ApiError(409, f"Measured boot policy with name {name} already exists") from None
        except NameUnknown:
            raise ApiError(409, f"Measured boot policy with name {name} does not already exist") from None
        return json_response(201)

    @app.api.route("/mbpolicies/<name>", methods=("POST",), body_limit="policy")
    async def add_mb_policy(name: str) -> Response:
        return await save_mb(name, True)

    @app.api.route("/mbpolicies/<name>", methods=("PUT",), body_limit="policy")
    async def update_mb_policy(name: str) -> Response:
        return await save_mb(name, False)

    @app.api.route("/mbpolicies/<name>", methods=("GET",))
    async def get_mb_policy(name: str) -> Response:
        name = _policy_name(name, "measured boot")
        text = await mstore.get(name)
        if text is None:
            raise ApiError(404, f"Measured boot policy {name} not found")
        return ok({"name": name, "mb_policy": text})

    @app.api.route("/mbpolicies/<name>", methods=("DELETE",))
    async def delete_mb_policy(name: str) -> Response:
        name = _policy_name(name, "measured boot")
        try:
            await mstore.delete(name)
        except NameUnknown:
            raise ApiError(404, f"Measured boot policy {name} not found") from None
        except NameInUse as exc:
            raise ApiError(409, f"Can't delete mb_policy as it's currently in use by agent {_users(exc.agent_ids)}") \
                from None
        return Response(b"", status=204, mimetype="application/json")  # upstream: 204, no body

    # --- /verify/* (public) ----------------------------------------------------------------------

    @app.api.route("/verify/evidence", methods=("POST",), public=True, body_limit="evidence")
    async def verify_evidence() -> Response:
        doc = await json_body(allow_surrogates=True)
        kind = doc.get("type")
        if kind is None or kind == "":
            raise ApiError(400, "Bad request: missing parameter type",
                           {"valid": evidence.valid_value(False, g.api_version),
                            "failures": [evidence.missing_param("type")]})
        if kind != "tpm":
            raise ApiError(400, f"Bad request: unsupported evidence type {str(kind)[:32]!r}",
                           {"valid": evidence.valid_value(False, g.api_version),
                            "failures": [evidence.invalid_param("type", "only 'tpm' evidence is supported")]})
        data = doc.get("data")
        try:
            fails = await trio.to_thread.run_sync(
                partial(evidence.check_tpm_evidence, data, ignore_tomtou_errors=ignore_tomtou_errors))
        except evidence.EvidenceRejected as exc:
            raise ApiError(400, f"Bad request: {exc}", {"valid": evidence.valid_value(False, g.api_version),
                                                        "failures": exc.failures}) from None
        return ok({
            "valid": evidence.valid_value(not fails, g.api_version),
            "failures": [evidence.failure_json(f) for f in fails],
            "claims": data,
        })

    @app.api.route("/verify/identity", methods=("GET",), public=True)
    async def verify_identity() -> Response:
        args = {n: request.args.get(n) for n in evidence.IDENTITY_PARAMS}
        missing = [evidence.missing_param(n) for n, v in args.items() if not v]
        if missing:
            raise ApiError(400, "Bad request: missing parameters", {"failures": missing})
        aid = parse_agent_id(args["agent_uuid"])
        row = await records.get(store, aid)
        if row is None:
            raise ApiError(404, f"Agent {aid} not found")
        fails = evidence.check_identity(row, args["quote"], args["nonce"], args["hash_alg"])
        return ok({"valid": 0 if fails else 1, "failures": [evidence.failure_json(f) for f in fails]})

    return app


def _is_empty_mb(value: object) -> bool:
    if isinstance(value, dict):
        return not value
    return isinstance(value, str) and value.strip() not in ("", "null") and mb_policy_is_empty(value)


def _users(agent_ids: list[str]) -> str:
    """Upstream names the one agent using a policy (and answers 500 when there are several)."""
    more = len(agent_ids) - 1
    return agent_ids[0] + (f" (and {more} more)" if more > 0 else "")


def _policy_name(raw: str, kind: str = "runtime") -> str:
    if not _POLICY_NAME.fullmatch(raw):
        raise ApiError(400, f"Bad request: {kind} policy name must be 1-255 of [A-Za-z0-9._:@+-]")
    return raw


async def _enrol_mb_policy(mstore: MbPolicyStore, values: dict[str, Any]) -> None:
    """Resolve the enrolment's measured-boot policy (inline ``mb_policy`` and/or ``mb_policy_name``)."""
    name = values.get("mb_policy_name") or None
    if name is not None:
        _policy_name(name, "measured boot")
    try:
        await resolve_enrolment(mstore, values)
    except PolicyRefused as exc:
        raise _policy_refused(exc) from None
    except NameExists:
        raise ApiError(409, f"Measured boot policy {name} already exists with different content") from None
    except NameUnknown:
        raise ApiError(404, f"Measured boot policy {name} not found") from None


def _policy_refused(exc: PolicyRefused) -> ApiError:
    return ApiError(400, f"Bad request: {exc.field}: {exc.reason}", {"field": exc.field, "reason": exc.reason})


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
        tpm_text = _tpm_policy(tpm_policy) if tpm_policy not in (None, "") else None
    except ProtocolError as exc:
        raise bad_request(exc) from None
    try:
        raw = decode_policy_b64(doc.get("runtime_policy"))
    except PolicyRefused as exc:
        raise _policy_refused(exc) from None
    if not raw:
        raise ApiError(400, "Bad request: runtime_policy: a policy is required",
                       {"field": "runtime_policy", "reason": "a policy is required"})
    return raw, key or None, tpm_text


async def _enrol_policy(pstore: PolicyStore, values: dict[str, Any]) -> None:
    """Resolve/store the enrolment's runtime policy; sets runtime_policy_checksum (or none)."""
    name = values.get("runtime_policy_name") or None
    key = values.get("runtime_policy_key") or None
    if name is not None:
        name = _policy_name(name)
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
            policy = pstore.by_name(name)
            if policy is None:
                raise ApiError(404, f"Runtime policy {name} not found")
            values["runtime_policy_checksum"] = policy.checksum
    except PolicyRefused as exc:
        raise _policy_refused(exc) from None
    except NameExists:
        raise ApiError(409, f"Runtime policy {name} already exists with different content") from None
