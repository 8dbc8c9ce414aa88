"""The verifier's agent routes: ``POST|GET|DELETE /v2.x/agents/{uuid}``,
``GET /v2.x/agents/?verifier=ID[&bulk]``, ``PUT /v2.x/agents/{uuid}/stop`` and ``…/reactivate``.

The body of an enrolment is checked by enrolment.py; its policies are resolved by
routes_policies.py. The monitor is not started here: the actor injects hooks (``on_enrolled`` …)
that run after the store has committed the change. A hook may be a plain function or a coroutine
function taking the agent id.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quart import Response, g, request

from keytrio.actors.common.app import ApiError, KeytrioApp, json_body, ok, parse_agent_id
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.enrolment import parse_enrolment
from keytrio.actors.verifier.mbpolicies import MbPolicyStore
from keytrio.actors.verifier.policies import PolicyStore
from keytrio.actors.verifier.push.verify import TIMEOUT as PUSH_TIMEOUT
from keytrio.actors.verifier.routes_policies import enrol_policies

Hook = Callable[[str], Awaitable[None] | None]

MAX_INTERVAL_FACTOR = 5  # upstream's push_agent_monitor._TIMEOUT_MULTIPLIER
_FAILED_STATES = {records.FAILED, records.INVALID_QUOTE, records.TENANT_FAILED, records.TERMINATED}


@dataclass(frozen=True)
class AgentHooks:
    """What the actor runs after the store committed an agent's change (None: nothing)."""

    on_enrolled: Hook | None = None
    on_deleted: Hook | None = None
    on_stop: Hook | None = None
    on_reactivate: Hook | None = None


@dataclass(frozen=True)
class VerifierFacts:
    """What the agent records report about this verifier and what a new enrolment starts with."""

    verifier_id: str
    ip: str
    port: int | Callable[[], int]  #: a callable with port = 0: the actor binds first
    quote_interval: float
    initial_state: int
    clock: Callable[[], float]
    mode: str = "pull"  #: pull | push | both: whether enrolments without an address are push agents


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
            # a push agent that missed its maximum_attestation_interval: upstream's TIMEOUT
            status = "TIMEOUT" if row["last_event_id"] == PUSH_TIMEOUT else "FAIL"
        elif row["attestation_count"] == 0:
            status = "PENDING"
        else:
            status = "PASS"
        view["attestation_status"] = status
        view["attestation_period"] = f"{quote_interval:g}s"
        # upstream: the time after which a push-mode agent counts as timed out, 5 quote intervals
        view["maximum_attestation_interval"] = f"{quote_interval * MAX_INTERVAL_FACTOR:g}s"
    return view


# --- the routes ------------------------------------------------------------------------------------


async def _call(hook: Hook | None, agent_id: str) -> None:
    if hook is None:
        return
    result = hook(agent_id)
    if inspect.isawaitable(result):
        await result


def install(
    app: KeytrioApp, store: Store, pstore: PolicyStore, mstore: MbPolicyStore, *,
    facts: VerifierFacts, hooks: AgentHooks,
) -> None:
    """The agent routes on ``app``."""

    def view(row: dict[str, Any]) -> dict[str, Any]:
        port = facts.port() if callable(facts.port) else facts.port
        return agent_view(
            row, version=g.api_version, verifier_ip=facts.ip, verifier_port=port,
            quote_interval=facts.quote_interval,
        )

    @app.api.route("/agents/<agent_id>", methods=("POST",), body_limit="policy")
    async def add_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        values = parse_enrolment(aid, await json_body(), mode=facts.mode)
        await enrol_policies(pstore, mstore, values)
        values.update(
            operational_state=facts.initial_state,
            verifier_id=facts.verifier_id,
            enrolled_at=facts.clock(),
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
        await _call(hooks.on_enrolled, aid)
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
        await _call(hooks.on_deleted, aid)
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
        await _call(hooks.on_stop, aid)
        return ok()

    @app.api.route("/agents/<agent_id>/reactivate", methods=("PUT",))
    async def reactivate_agent(agent_id: str) -> Response:
        aid = parse_agent_id(agent_id)
        if not await records.reactivate(store, aid):  # state + progress reset: one transaction
            raise ApiError(404, f"Agent {aid} not found")
        await _call(hooks.on_reactivate, aid)
        return ok()
