"""The verifier's public ``/verify/*`` routes (no client certificate): ``POST /v2.x/verify/evidence``
checks submitted TPM evidence once, ``GET /v2.x/verify/identity`` an identity quote of an enrolled
agent; the checks themselves are evidence.py's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import trio
from quart import Response, g, request

from keytrio.actors.common.app import ApiError, KeytrioApp, json_body, ok, parse_agent_id
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import evidence, records

#: Evidence whose IMA list + runtime policy are at most this many characters (~250 lines with
#: their policy entries, ~1 ms of checking) is checked on the event loop; larger evidence in a
#: worker thread, so that one big upload does not hold up the other connections and the polls.
INLINE_MAX_CHARS = 64 << 10


def install(app: KeytrioApp, store: Store, *, ignore_tomtou_errors: bool) -> None:
    """The ``/verify/*`` routes on ``app`` (its ``public_routes`` must include ``/verify/*``)."""

    async def check_evidence(doc: dict[str, Any], version: str) -> dict[str, Any]:
        kind = doc.get("type")
        if kind is None or kind == "":
            raise ApiError(400, "Bad request: missing parameter type",
                           {"valid": evidence.valid_value(False, version),
                            "failures": [evidence.missing_param("type")]})
        if kind != "tpm":
            raise ApiError(400, f"Bad request: unsupported evidence type {str(kind)[:32]!r}",
                           {"valid": evidence.valid_value(False, version),
                            "failures": [evidence.invalid_param("type", "only 'tpm' evidence is supported")]})
        data = doc.get("data")
        check = partial(evidence.check_tpm_evidence, data, ignore_tomtou_errors=ignore_tomtou_errors)
        try:
            if evidence.inline_size(data) <= INLINE_MAX_CHARS:
                fails = check()  # cheaper than the hand-over to a thread and back
            else:
                fails = await trio.to_thread.run_sync(check)
        except evidence.EvidenceRejected as exc:
            raise ApiError(400, f"Bad request: {exc}", {"valid": evidence.valid_value(False, version),
                                                        "failures": exc.failures}) from None
        return {
            "valid": evidence.valid_value(not fails, version),
            "failures": [evidence.failure_json(f) for f in fails],
            "claims": data,
        }

    # the fast route answers /v<version>/verify/evidence itself; the quart view the variants
    @app.api.route("/verify/evidence", methods=("POST",), public=True, body_limit="evidence",
                   fast=check_evidence, allow_surrogates=True, fast_echo="claims")
    async def verify_evidence() -> Response:
        return ok(await check_evidence(await json_body(allow_surrogates=True), g.api_version))

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
