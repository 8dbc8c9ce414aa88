"""Push-mode agents (API v3.0) from the tenant: enrolment without a contact address, and the
attestation history.

A push agent listens on no port, so the pull add flow's agent steps (identity quote, U, keys/verify)
have nobody to ask: the verifier checks the TPM itself (the PoP session proves the AK the
registrar holds; every quote is signed by it). What is left of the add flow: the registrar record,
the EK check, and the enrolment POST with ``cloudagent_ip``, ``cloudagent_port``, ``v`` and
``mtls_cert`` null, as upstream's ``keylime_tenant -c add --push-model`` sends it.

The history is the verifier's ``GET /v3/agents/{id}/attestations`` over the tenant's admin mTLS
connection: a JSON:API document, not the v2 envelope, so it is read here rather than by
:meth:`actors.tenant.client.Peer.call`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from keytrio.actors.tenant.add import AddRequest, _Registration, check_request, enrolment_body
from keytrio.actors.tenant.context import TenantContext
from keytrio.actors.tenant.ekcheck import check_ek
from keytrio.actors.tenant.errors import ConnectionProblem, Refused, UsageError
from keytrio.protocol import safejson

log = logging.getLogger("keytrio.tenant")

#: ``supported_version`` of a push enrolment: the API the agent speaks (nothing calls it back)
PUSH_AGENT_VERSION = "3.0"
_V3 = "/v3"


@dataclass(frozen=True)
class PushAddResult:
    agent_id: str
    registrar_version: str
    verifier_version: str


async def add_push_agent(t: TenantContext, req: AddRequest, *,
                         warn: Callable[[str], None] | None = None) -> PushAddResult:
    """Enrol a push-mode agent: registrar record, EK check, enrolment with no contact address.
    ``warn`` (default: a log warning) hears of a record that looks like a pull agent's."""
    if req.payload:
        raise UsageError("a push agent takes no payload: nothing can deliver U to an agent that listens on no port")
    checked = check_request(req)
    registrar = await t.ready(t.registrar)
    record = (await registrar.call("GET", f"/agents/{req.agent_id}")).results
    aik, ek = record.get("aik_tpm"), record.get("ek_tpm")
    if not isinstance(aik, str) or not isinstance(ek, str):
        raise Refused("registrar", 200, "record without aik_tpm/ek_tpm")
    if record.get("ip") or record.get("port"):
        # a push agent registers no contact address; a pull agent enrolled in push mode never
        # pushes, and the verifier fails it (and sends a revocation notice) once its
        # maximum_attestation_interval passes
        (warn or log.warning)(
            f"the registrar has a contact address for {req.agent_id} ({record.get('ip')}:{record.get('port')}): "
            "a pull-mode agent enrolled in push mode does not attest and will be failed after the "
            "verifier's maximum_attestation_interval; enrol it without --push if it is one")
    if checked.ek_store is not None:
        check_ek(record.get("ekcert"), ek, checked.ek_store)
    verifier = await t.ready(t.verifier)
    body = enrolment_body(req, checked, _Registration(aik, ek, "", "", 0, None), b"", PUSH_AGENT_VERSION)
    body.update(v=None, cloudagent_ip=None, cloudagent_port=None, mtls_cert=None)
    await verifier.call("POST", f"/agents/{req.agent_id}", body)
    assert registrar.version is not None and verifier.version is not None
    return PushAddResult(req.agent_id, registrar.version, verifier.version)


async def attestations(t: TenantContext, agent_id: str) -> list[dict[str, Any]]:
    """The agent's attestations as the verifier keeps them: dicts of ``index`` plus the
    resource's attributes (stage, evaluation, failure_reason, times, ...)."""
    doc = await _get_v3(t, f"/agents/{agent_id}/attestations")
    items = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ConnectionProblem(t.verifier.name, "malformed response: no JSON:API data list")
    return [_attestation(item) for item in items]


async def latest_attestation(t: TenantContext, agent_id: str) -> dict[str, Any] | None:
    """``GET /v3/agents/{id}/attestations/latest`` as :func:`attestations` reads one; None when the
    agent has not attested yet (the verifier's 404)."""
    doc = await _get_v3(t, f"/agents/{agent_id}/attestations/latest", missing_ok=True)
    if doc is None:
        return None
    return _attestation(doc.get("data") if isinstance(doc, dict) else None)


async def _get_v3(t: TenantContext, path: str, *, missing_ok: bool = False) -> Any:
    """A v3 GET over the tenant's admin mTLS connection: the JSON:API document, or None on 404
    with ``missing_ok``; Refused with the error's detail otherwise."""
    peer = t.verifier
    url = peer.url(f"{_V3}{path}", versioned=False)
    try:
        r = await peer.client.get(url, headers={"Accept": "application/vnd.api+json, application/json"})
    except httpx.HTTPError as exc:
        raise ConnectionProblem(peer.name, f"{type(exc).__name__}: {exc}") from exc
    try:
        doc = safejson.loads(r.content)
    except safejson.JsonError:  # not JSON, or nested deeper than any answer (a hostile server)
        doc = None
    if r.status_code == 404 and missing_ok:
        return None
    if r.status_code != 200:
        raise Refused(peer.name, r.status_code, _error_detail(doc) or r.reason_phrase)
    return doc


def _attestation(item: object) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("attributes"), dict):
        raise ConnectionProblem("verifier", "malformed response: an attestation without attributes")
    out: dict[str, Any] = {"index": _index(item)}
    out.update(item["attributes"])
    return out


def _index(item: dict[str, Any]) -> int | None:
    # data.id when present; upstream sends none, only links.self (.../attestations/{n})
    raw = item.get("id")
    if raw is None:
        link = (item.get("links") or {}).get("self") if isinstance(item.get("links"), dict) else None
        raw = link.rsplit("/", 1)[-1] if isinstance(link, str) else None
    return int(raw) if isinstance(raw, str) and raw.isascii() and raw.isdigit() else None


def _error_detail(doc: object) -> str:
    if isinstance(doc, dict):
        errs = doc.get("errors")
        if isinstance(errs, list) and errs and isinstance(errs[0], dict):
            return str(errs[0].get("detail") or errs[0].get("title") or "")
        if isinstance(doc.get("status"), str):
            return str(doc["status"])
    return ""


def format_attestations(items: list[dict[str, Any]]) -> list[str]:
    """One line per attestation for the CLI: index, stage, evaluation, failure reason, time."""
    if not items:
        return ["no attestations yet"]
    lines = []
    for a in items:
        when = a.get("verification_completed_at") or a.get("evidence_received_at") or a.get("capabilities_received_at")
        reason = a.get("failure_reason")
        lines.append(" ".join(str(x) for x in (
            f"#{a.get('index')}", a.get("stage"), a.get("evaluation"),
            *([f"({reason})"] if reason else []), *([when] if when else []))))
    return lines
