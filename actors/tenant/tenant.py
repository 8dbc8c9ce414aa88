"""The tenant library's entry point:

    async with Tenant(registrar_url, verifier_url, ca_files=[ca], client_cert=c, client_key=k) as t:
        result = await t.add(agent_id, tpm_policy={"mask": "0x0"}, payload=make_payload(d))
        print(await t.status(agent_id))

Registrar and verifier are reached over mTLS (server certs from ``ca_files``, our client cert);
agents over mTLS with their registered ``mtls_cert`` pinned. Errors are the typed
:mod:`actors.tenant.errors` classes.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import keytrio.actors.tenant.add as add_flow
import keytrio.actors.tenant.ops as ops
import keytrio.actors.tenant.policies as policies
from keytrio.actors.tenant.client import (
    TENANT_AGENT_VERSIONS,
    TENANT_SERVER_VERSIONS,
    Peer,
    agent_peer,
    host_url,
    server_peer,
)
from keytrio.actors.tenant.errors import UsageError, VerificationFailed
from keytrio.protocol import validation
from keytrio.protocol.errors import ValidationError

StrPath = str | os.PathLike[str]


class Tenant:
    """Clients to one registrar and one verifier; see :meth:`add` and the operations below."""

    def __init__(
        self,
        registrar_url: str,
        verifier_url: str,
        *,
        ca_files: Iterable[StrPath],
        client_cert: StrPath,
        client_key: StrPath,
        request_timeout: float = 30.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.ca_files = [Path(p) for p in ca_files]
        if not self.ca_files:
            raise UsageError("ca_files: at least one CA file is needed")
        self.client_cert = Path(client_cert)
        self.client_key = Path(client_key)
        self.request_timeout = request_timeout
        self.poll_interval = poll_interval
        try:
            self.registrar = server_peer("registrar", registrar_url, ca_files=self.ca_files,
                                         client_cert=self.client_cert, client_key=self.client_key,
                                         timeout=request_timeout)
            self.verifier = server_peer("verifier", verifier_url, ca_files=self.ca_files,
                                        client_cert=self.client_cert, client_key=self.client_key,
                                        timeout=request_timeout)
        except (OSError, ValueError) as exc:  # unreadable cert/key/CA files (ssl.SSLError is an OSError)
            raise UsageError(f"TLS files: {exc}") from exc

    async def __aenter__(self) -> Tenant:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.registrar.client.aclose()
        await self.verifier.client.aclose()

    # -- plumbing shared by add.py and ops.py ---------------------------------------------------------

    async def ready(self, peer: Peer) -> Peer:
        """``peer`` with its API version negotiated (once)."""
        if peer.version is None:
            await peer.negotiate(TENANT_SERVER_VERSIONS)
        return peer

    @asynccontextmanager
    async def agent(self, ip: str, port: int, mtls_cert: str) -> AsyncIterator[Peer]:
        """A negotiated connection to an agent, trusting only its registered ``mtls_cert``."""
        try:
            peer = agent_peer(host_url(ip, port), mtls_cert, ca_files=self.ca_files,
                              client_cert=self.client_cert, client_key=self.client_key,
                              timeout=self.request_timeout)
        except (ValueError, ssl.SSLError) as exc:  # the registered mtls_cert is not a usable cert
            raise VerificationFailed("agent mtls_cert", f"unusable: {exc}") from exc
        async with peer.client:
            await peer.negotiate(TENANT_AGENT_VERSIONS)
            yield peer

    # -- operations ------------------------------------------------------------------------------------

    async def add(self, agent_id: str, **options: Any) -> add_flow.AddResult:
        """Enrol ``agent_id``; the options are the fields of :class:`actors.tenant.add.AddRequest`."""
        return await self.enrol(add_flow.AddRequest(agent_id, **options))

    async def enrol(self, request: add_flow.AddRequest) -> add_flow.AddResult:
        """Run :func:`actors.tenant.add.add_agent` for ``request``."""
        agent_id = check_agent_id(request.agent_id)
        return await add_flow.add_agent(self, dataclasses.replace(request, agent_id=agent_id))

    async def delete(self, agent_id: str, *, wait: bool = True, timeout: float = 30.0) -> None:
        await ops.delete(self, check_agent_id(agent_id), wait=wait, timeout=timeout)

    async def status(self, agent_id: str) -> dict[str, Any]:
        return await ops.status(self, check_agent_id(agent_id))

    async def stop(self, agent_id: str) -> None:
        await ops.stop(self, check_agent_id(agent_id))

    async def reactivate(self, agent_id: str) -> None:
        await ops.reactivate(self, check_agent_id(agent_id))

    async def regdelete(self, agent_id: str) -> None:
        await ops.regdelete(self, check_agent_id(agent_id))

    async def list(self, verifier_id: str | None = None) -> list[str]:
        return await ops.list_agents(self, verifier_id)

    async def reglist(self) -> list[str]:
        return await ops.list_registrar(self)

    # -- runtime policies (``/allowlists/``, see actors.tenant.policies) -----------------------------

    async def policy_add(self, name: str, policy: bytes, *, key: str | None = None,
                         tpm_policy: str | None = None) -> None:
        await policies.add(self, name, policy, key=key, tpm_policy=tpm_policy)

    async def policy_update(self, name: str, policy: bytes, *, key: str | None = None,
                            tpm_policy: str | None = None) -> None:
        await policies.add(self, name, policy, key=key, tpm_policy=tpm_policy, update=True)

    async def policy_show(self, name: str) -> dict[str, Any]:
        return await policies.show(self, name)

    async def policy_list(self) -> list[str]:
        return await policies.list_names(self)

    async def policy_delete(self, name: str) -> None:
        await policies.delete(self, name)


def check_agent_id(agent_id: object) -> str:
    try:
        return validation.agent_id(agent_id)
    except ValidationError as exc:
        raise UsageError(f"agent id {agent_id!r}: {exc.reason}") from exc

