"""The agent's HTTPS API (PROTOCOL.md "Agent"), served at /v2.1 plus /version.

Every route needs a client cert from the trusted CA (the TLS layer already requires one at the
handshake; app.py checks the chain again). Bad input -> 400 naming the field; nothing changes.
"""

from __future__ import annotations

from typing import Any

from quart import Response, request

from keytrio.actors.agent.keys import KeyError400, Keys
from keytrio.actors.agent.quotes import AgentMetrics, QuoteSource
from keytrio.actors.agent.revocation import NoticeRefused, Revocations
from keytrio.actors.agent.tpm import TpmError
from keytrio.actors.common.app import ApiError, KeytrioApp, json_body, json_response, make_app, ok
from keytrio.protocol import validation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.versions import AGENT_VERSIONS, agent_version_payload
from keytrio.protocol.wire import KeyVerify

MAX_IMA_ENTRY = 1 << 40


def _arg(name: str, *, required: bool = True) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"Invalid {name}: given more than once")
    if not values:
        if required:
            raise ApiError(400, f"Missing query parameter: {name}")
        return None
    return values[0]


def build_app(
    *,
    trusted_client_ca: list[str],
    max_upload_size: int,
    nk_pem: str,
    quotes: QuoteSource,
    keys: Keys,
    revocations: Revocations,
    metrics: AgentMetrics | None = None,
) -> KeytrioApp:
    m = metrics or AgentMetrics()
    app = make_app(
        "keytrio-agent",
        versions=AGENT_VERSIONS,
        require_client_cert=True,
        trusted_client_ca=trusted_client_ca,
        max_upload_size=max_upload_size,
        version_payload=agent_version_payload(),
    )

    @app.errorhandler(ValidationError)
    async def _validation(exc: ValidationError) -> Response:
        return json_response(400, None, f"Invalid {exc.field}: {exc.reason}")

    _quote_routes(app, quotes, m)
    _key_routes(app, nk_pem, keys, m)
    _notice_routes(app, revocations, m)
    return app


def _integrity_args() -> tuple[str, list[int], bool, int]:
    """nonce, PCRs, partial and first IMA entry of an integrity-quote request, each checked."""
    nonce = validation.nonce(_arg("nonce"))
    mask_text = _arg("mask", required=False)
    pcrs = validation.mask_to_pcrs(validation.pcr_mask(mask_text)) if mask_text is not None else []
    partial_text = _arg("partial", required=False)
    if partial_text not in (None, "0", "1"):
        raise ApiError(400, "Invalid partial: must be 0 or 1")
    partial = partial_text != "0"  # upstream's default is a partial quote (no pubkey)
    entry_text = _arg("ima_ml_entry", required=False)
    entry = 0
    if entry_text is not None:
        entry = validation.integer(entry_text, "ima_ml_entry", lo=0, hi=MAX_IMA_ENTRY)
    return nonce, pcrs, partial, entry


def _quote_routes(app: KeytrioApp, quotes: QuoteSource, m: AgentMetrics) -> None:
    @app.api.route("/quotes/identity")
    async def identity_quote() -> Response:
        nonce = validation.nonce(_arg("nonce"))
        try:
            results = (await quotes.identity(nonce)).encode()
        except TpmError as exc:
            m.quotes.labels("identity", "error").inc()
            raise ApiError(500, "TPM quote failed") from exc
        m.quotes.labels("identity", "ok").inc()
        return ok(results)

    @app.api.route("/quotes/integrity")
    async def integrity_quote() -> Response:
        nonce, pcrs, partial, entry = _integrity_args()
        try:
            results = (await quotes.integrity(nonce, pcrs, partial, entry)).encode()
        except TpmError as exc:
            m.quotes.labels("integrity", "error").inc()
            raise ApiError(500, "TPM quote failed") from exc
        m.quotes.labels("integrity", "ok").inc()
        return ok(results)


def _key_routes(app: KeytrioApp, nk_pem: str, keys: Keys, m: AgentMetrics) -> None:
    @app.api.route("/keys/pubkey")
    async def pubkey() -> Response:
        return ok({"pubkey": nk_pem})

    @app.api.route("/keys/ukey", methods=("POST",))
    async def ukey() -> Response:
        body = await json_body()
        status = await _keys_call(keys.post_ukey(body), m, "u")
        return ok({}, status)

    @app.api.route("/keys/vkey", methods=("POST",))
    async def vkey() -> Response:
        body = await json_body()
        status = await _keys_call(keys.post_vkey(body), m, "v")
        return ok({}, status)

    @app.api.route("/keys/verify")
    async def verify() -> Response:
        challenge = _arg("challenge")
        try:
            hmac_hex = keys.verify(challenge)
        except KeyError400 as exc:
            raise ApiError(400, str(exc)) from exc
        return ok(KeyVerify(hmac_hex).encode())


def _notice_routes(app: KeytrioApp, revocations: Revocations, m: AgentMetrics) -> None:
    @app.api.route("/notifications/revocation", methods=("POST",))
    async def revocation_notice() -> Response:
        body = await json_body()
        try:
            status = await revocations.handle(body)
        except NoticeRefused as exc:
            m.notices.labels("refused").inc()
            raise ApiError(403, str(exc)) from exc
        except ValidationError:
            m.notices.labels("invalid").inc()
            raise
        m.notices.labels("duplicate" if "already" in status else "handled").inc()
        return ok({}, status)


async def _keys_call(coro: Any, m: AgentMetrics, half: str) -> str:
    try:
        status = await coro
    except KeyError400 as exc:
        m.keys.labels(half, "refused").inc()
        raise ApiError(400, str(exc)) from exc
    except ValidationError:
        m.keys.labels(half, "refused").inc()
        raise
    except ProtocolError as exc:  # e.g. a half of the wrong size
        m.keys.labels(half, "refused").inc()
        raise ApiError(400, "Invalid key material") from exc
    m.keys.labels(half, "derived" if "derived" in status else "stored").inc()
    return status
