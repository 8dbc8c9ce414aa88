"""Tenant operations besides add: delete, status, stop, reactivate, regdelete, list."""

from __future__ import annotations

from typing import Any

import trio

import keytrio.actors.tenant.push as push
from keytrio.actors.tenant.context import TenantContext
from keytrio.actors.tenant.errors import Refused, VerificationFailed
from keytrio.protocol import states


async def _get_or_none(t: TenantContext, peer_name: str, agent_id: str) -> dict[str, Any] | None:
    peer = await t.ready(t.registrar if peer_name == "registrar" else t.verifier)
    reply = await peer.call("GET", f"/agents/{agent_id}", expect=(200, 404))
    return reply.results if reply.status_code == 200 else None


async def status(t: TenantContext, agent_id: str) -> dict[str, Any]:
    """``{"agent_id", "registrar": record|None, "verifier": record|None, "operational_state",
    "operational_state_name"}``; Refused(404) when neither knows the agent."""
    registrar = await _get_or_none(t, "registrar", agent_id)
    verifier = await _get_or_none(t, "verifier", agent_id)
    if registrar is None and verifier is None:
        raise Refused("verifier", 404, f"agent {agent_id} is known to neither registrar nor verifier")
    state = verifier.get("operational_state") if verifier is not None else None
    st: dict[str, Any] = {
        "agent_id": agent_id,
        "registrar": registrar,
        "verifier": verifier,
        "operational_state": state,
        "operational_state_name": states.name(state) if verifier is not None else None,
    }
    if verifier is not None and is_push_record(verifier):
        # the v2 record says little about a push agent's cycle: its latest attestation does
        st["latest_attestation"] = await push.latest_attestation(t, agent_id)
    return st


def is_push_record(record: dict[str, Any]) -> bool:
    """A push agent is enrolled without a contact address (cloudagent_ip/port null)."""
    return record.get("ip") in (None, "") and record.get("port") in (None, "", 0)


async def delete(t: TenantContext, agent_id: str, *, wait: bool = True, timeout: float = 30.0) -> None:
    """DELETE at the verifier; with ``wait`` poll until the record is gone (a verifier may answer
    202 while it terminates the agent's monitor)."""
    verifier = await t.ready(t.verifier)
    await verifier.call("DELETE", f"/agents/{agent_id}", expect=(200, 202))
    if not wait:
        return
    with trio.move_on_after(timeout):
        while await _get_or_none(t, "verifier", agent_id) is not None:
            await trio.sleep(t.poll_interval)
        return
    raise VerificationFailed("delete", f"agent {agent_id} still at the verifier after {timeout:g} s")


async def stop(t: TenantContext, agent_id: str) -> None:
    """``PUT …/stop``: polling ends, state Tenant Quote Failed (10)."""
    verifier = await t.ready(t.verifier)
    await verifier.call("PUT", f"/agents/{agent_id}/stop")


async def reactivate(t: TenantContext, agent_id: str) -> None:
    """``PUT …/reactivate``: attestation starts again."""
    verifier = await t.ready(t.verifier)
    await verifier.call("PUT", f"/agents/{agent_id}/reactivate")


async def regdelete(t: TenantContext, agent_id: str) -> None:
    """DELETE the registrar's record."""
    registrar = await t.ready(t.registrar)
    await registrar.call("DELETE", f"/agents/{agent_id}")


async def list_agents(t: TenantContext, verifier_id: str | None = None) -> list[str]:
    """Agent ids at the verifier (of one ``verifier_id`` when given)."""
    verifier = await t.ready(t.verifier)
    params = {"verifier": verifier_id} if verifier_id is not None else None
    res = (await verifier.call("GET", "/agents/", params=params)).results
    return _flatten_ids(res.get("uuids"), "verifier")


async def list_registrar(t: TenantContext) -> list[str]:
    registrar = await t.ready(t.registrar)
    res = (await registrar.call("GET", "/agents/")).results
    return _flatten_ids(res.get("uuids"), "registrar")


def _flatten_ids(uuids: object, peer: str) -> list[str]:
    """Upstream's verifier lists ``[["id"], …]``, its registrar ``["id", …]``."""
    if not isinstance(uuids, list):
        raise Refused(peer, 200, "agent list without 'uuids'")
    out: list[str] = []
    for item in uuids:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            out.extend(x for x in item if isinstance(x, str))
    return out
