"""What the tenant's operation modules need from a :class:`actors.tenant.tenant.Tenant`.

A leaf module: add, ops, policies and mbpolicies take a :class:`TenantContext` rather than the
Tenant itself, so the Tenant imports them and none of them imports it back.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from keytrio.actors.tenant.client import Peer


class TenantContext(Protocol):
    """The registrar and verifier peers, their negotiation, and pinned agent connections."""

    registrar: Peer
    verifier: Peer
    poll_interval: float  # seconds between polls while waiting for a state

    async def ready(self, peer: Peer) -> Peer:
        """``peer`` with its API version negotiated (once)."""
        ...

    def agent(self, ip: str, port: int, mtls_cert: str) -> AbstractAsyncContextManager[Peer]:
        """A negotiated connection to an agent, trusting only its registered ``mtls_cert``."""
        ...
