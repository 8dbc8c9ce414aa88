"""HTTP(S) peers of the tenant: registrar and verifier (mTLS, CA-issued server certs) and agents
(mTLS, trust = the CA + the agent's registered ``mtls_cert``, pinned).

Every call goes through :meth:`Peer.call`, which turns actors.common.client errors into the
tenant's typed errors: no response -> :class:`ConnectionProblem`, an error status ->
:class:`Refused` (status + the envelope's status text).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import httpx

from keytrio.actors.common import tls
from keytrio.actors.common.client import (
    ClientError,
    CommunicationError,
    HttpError,
    MalformedResponse,
    Reply,
    make_client,
    request_json,
)
from keytrio.actors.tenant.errors import ConnectionProblem, Refused
from keytrio.protocol import versions

StrPath = str | os.PathLike[str]

#: Versions this tenant speaks towards the verifier and registrar, and towards agents. The
#: enrolment body and the calls used are the same in 2.0-2.5, so any common one will do.
TENANT_SERVER_VERSIONS: tuple[str, ...] = versions.SERVER_VERSIONS
TENANT_AGENT_VERSIONS: tuple[str, ...] = versions.SERVER_VERSIONS


class Peer:
    """One peer: a name for messages, a base URL, an httpx client, and the negotiated version."""

    def __init__(self, name: str, base_url: str, client: httpx.AsyncClient) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.version: str | None = None

    def url(self, path: str, *, versioned: bool = True) -> str:
        if not versioned:
            return self.base_url + path
        if self.version is None:
            raise RuntimeError(f"{self.name}: API version not negotiated yet")
        return f"{self.base_url}/v{self.version}{path}"

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        expect: Collection[int] | None = (200,),
        versioned: bool = True,
        timeout: float | None = None,
    ) -> Reply:
        url = self.url(path, versioned=versioned)
        try:
            return await request_json(
                self.client, method, url, json, params=params, expect=expect, timeout=timeout
            )
        except CommunicationError as exc:
            raise ConnectionProblem(self.name, f"{exc.kind}: {exc.detail}") from exc
        except HttpError as exc:
            raise Refused(self.name, exc.status_code, exc.status_text, exc.results) from exc
        except MalformedResponse as exc:
            raise ConnectionProblem(self.name, f"malformed response: {exc.reason}") from exc
        except ClientError as exc:  # any other client-layer failure: still no usable answer
            raise ConnectionProblem(self.name, str(exc)) from exc

    async def negotiate(self, ours: Iterable[str]) -> str:
        """``GET /version`` and pick the highest version both sides speak (kept in ``version``).

        Servers answer ``supported_versions`` (+ ``current_version``); agents also
        ``supported_version``. A peer that names none we speak is a Refused (HTTP 200 kept).
        """
        reply = await self.call("GET", "/version", versioned=False)
        res = reply.results
        theirs: list[str] = []
        listed = res.get("supported_versions")
        if isinstance(listed, list):
            theirs.extend(v for v in listed if isinstance(v, str))
        for key in ("current_version", "supported_version"):
            if isinstance(res.get(key), str):
                theirs.append(res[key])
        chosen = versions.negotiate(tuple(ours), [v for v in theirs if _is_version(v)])
        if chosen is None:
            raise Refused(self.name, reply.status_code, f"no common API version (peer speaks {sorted(set(theirs))})")
        self.version = chosen
        return chosen


def _is_version(text: str) -> bool:
    major, _, minor = text.partition(".")
    return all(p.isascii() and p.isdigit() and len(p) <= 3 for p in (major, minor))


def server_peer(
    name: str,
    base_url: str,
    *,
    ca_files: Iterable[StrPath],
    client_cert: StrPath,
    client_key: StrPath,
    timeout: float,
) -> Peer:
    """The registrar's or verifier's HTTPS API (server cert from the CA, our client cert)."""
    ctx = tls.client_context(list(ca_files), client_cert, client_key)
    return Peer(name, base_url, make_client(ctx, timeout=timeout))


def agent_peer(
    base_url: str,
    mtls_cert: str,
    *,
    ca_files: Iterable[StrPath],
    client_cert: StrPath,
    client_key: StrPath,
    timeout: float,
) -> Peer:
    """An agent, trusted only through its registered ``mtls_cert`` (pinned; no hostname check).
    The caller closes ``peer.client``. ValueError/ssl.SSLError when ``mtls_cert`` is unusable."""
    ctx = tls.client_context(list(ca_files), client_cert, client_key, pinned_server_cert_pem=mtls_cert)
    return Peer("agent", base_url, make_client(ctx, timeout=timeout))


def host_url(ip: str, port: int) -> str:
    """``https://ip:port`` (IPv6 literals bracketed)."""
    host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
    return f"https://{host}:{port}"
