"""The verifier's REST API (HTTPS; client cert from ``trusted_client_ca`` except on public routes):
the wiring of one app from its rooms, one module a resource.

* routes_agents.py: ``/agents/`` (enrolment body: enrolment.py), with the actor's hooks;
* routes_policies.py: ``/allowlists/`` (runtime policies) and ``/mbpolicies/``, one CRUD shape;
* routes_verify.py: public ``/verify/evidence`` and ``/verify/identity``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from keytrio.actors.common.app import KeytrioApp, make_app
from keytrio.actors.common.bodylimit import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records, routes_agents, routes_policies, routes_verify
from keytrio.actors.verifier.config import DEFAULT_MAX_EVIDENCE_SIZE, DEFAULT_MAX_POLICY_SIZE
from keytrio.actors.verifier.mbpolicies import MbPolicyStore
from keytrio.actors.verifier.policies import PolicyStore
from keytrio.actors.verifier.routes_agents import AgentHooks, Hook, VerifierFacts
from keytrio.protocol.versions import SERVER_VERSIONS, newest, server_version_payload

#: The push model's API (served under /v3 and /v3.0 by push/routes.py when mode is push or both).
PUSH_VERSION = "3.0"


def version_payload(mode: str) -> dict[str, object]:
    """``GET /version``: "3.0" joins supported_versions when push is served, but current_version
    stays the newest v2.x, as upstream's registrar answers; clients that pick current_version keep
    speaking v2.x to the agents API, which v3.0 does not replace here (docs/compatibility.md)."""
    payload = server_version_payload()
    if mode in ("push", "both"):
        payload["supported_versions"] = [*SERVER_VERSIONS, PUSH_VERSION]
        payload["current_version"] = newest(SERVER_VERSIONS)
    return payload


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
    mode: str = "pull",
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
        version_payload=version_payload(mode),
    )

    pstore = policies if policies is not None else PolicyStore(store, clock=clock)
    mstore = mbpolicies if mbpolicies is not None else MbPolicyStore(store, clock=clock)
    facts = VerifierFacts(verifier_id=verifier_id, ip=ip, port=port, quote_interval=quote_interval,
                          initial_state=initial_state, clock=clock, mode=mode)
    hooks = AgentHooks(on_enrolled=on_enrolled, on_deleted=on_deleted, on_stop=on_stop,
                       on_reactivate=on_reactivate)
    routes_agents.install(app, store, pstore, mstore, facts=facts, hooks=hooks)
    routes_policies.install(app, pstore, mstore)
    routes_verify.install(app, store, ignore_tomtou_errors=ignore_tomtou_errors)
    return app
