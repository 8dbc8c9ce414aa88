"""The verifier's public ``/verify/*`` routes (no client certificate): ``POST /v2.x/verify/evidence``
checks submitted TPM evidence once, ``GET /v2.x/verify/identity`` an identity quote of an enrolled
agent; the checks themselves are evidence.py's.
"""

from __future__ import annotations

from functools import partial

import trio
from quart import Response, g, request

from keytrio.actors.common.app import ApiError, KeytrioApp, json_body, ok, parse_agent_id
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import evidence, records


def install(app: KeytrioApp, store: Store, *, ignore_tomtou_errors: bool) -> None:
    """The ``/verify/*`` routes on ``app`` (its ``public_routes`` must include ``/verify/*``)."""

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
