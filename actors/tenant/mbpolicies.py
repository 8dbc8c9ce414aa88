"""The verifier's named measured-boot policies (``/v2.x/mbpolicies/``): add, update, show, list, delete.

A reference state is validated here first (protocol.mb_policy, the verifier's own evaluator), so a
bad file is refused before it is sent. Wire shapes as upstream's: body ``{"mb_policy": "<JSON
text>"}``; POST/PUT answer 201, DELETE 204 with no body; the list is ``{"mbpolicy names": [...]}``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from keytrio.actors.tenant.context import TenantContext
from keytrio.actors.tenant.errors import ConnectionProblem, Refused, UsageError
from keytrio.protocol import mb_policy, safejson


def _error_body(body: bytes, default: str) -> tuple[str, dict[str, Any] | None]:
    """(status text, results) of an error envelope; the HTTP reason when the body is not one."""
    try:
        doc = safejson.loads(body)
    except safejson.JsonError:
        return default, None
    if not isinstance(doc, dict):
        return default, None
    results = doc.get("results")
    return str(doc.get("status") or default), results if isinstance(results, dict) else None


def check_mb_policy(raw: bytes | str) -> str:
    """The reference state as compact JSON text; UsageError naming the bad part."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        mb_policy.parse_refstate(text)
        return json.dumps(json.loads(text))
    except UnicodeDecodeError as exc:
        raise UsageError("measured-boot policy: not UTF-8 text") from exc
    except mb_policy.MbPolicyError as exc:
        raise UsageError(f"measured-boot policy: {exc}") from exc


async def add(t: TenantContext, name: str, policy: bytes | str, *, update: bool = False) -> None:
    """POST (a new name; 409 if it exists) or PUT (``update``; 409 if it does not exist)."""
    text = check_mb_policy(policy)
    verifier = await t.ready(t.verifier)
    await verifier.call("PUT" if update else "POST", f"/mbpolicies/{name}", {"mb_policy": text}, expect=(200, 201))


async def show(t: TenantContext, name: str) -> dict[str, Any]:
    verifier = await t.ready(t.verifier)
    return dict((await verifier.call("GET", f"/mbpolicies/{name}")).results)


async def list_names(t: TenantContext) -> list[str]:
    verifier = await t.ready(t.verifier)
    res = (await verifier.call("GET", "/mbpolicies/")).results
    names = res.get("mbpolicy names")
    if not isinstance(names, list):
        raise Refused("verifier", 200, "measured-boot policy list without 'mbpolicy names'")
    return [n for n in names if isinstance(n, str)]


async def delete(t: TenantContext, name: str) -> None:
    await delete_path(t, f"/mbpolicies/{name}")


async def delete_path(t: TenantContext, path: str) -> None:
    """DELETE a policy; upstream answers 204 without a body, so the envelope is only read on errors."""
    verifier = await t.ready(t.verifier)
    try:
        resp = await verifier.client.request("DELETE", verifier.url(path))
    except httpx.TransportError as exc:
        raise ConnectionProblem("verifier", f"{type(exc).__name__}: {exc}") from exc
    if resp.status_code in (200, 204):
        return
    status, results = _error_body(resp.content, resp.reason_phrase or "Error")
    raise Refused("verifier", resp.status_code, status, results)
