"""Shared by the push scenarios: a testbed whose verifier serves push (and pull), push machines
behind a NAT gateway, the enrolment step, and what the verifier stored about a push agent.

Quote interval 1 s: the verifier tells each push agent to come back after that
(seconds_to_next_attestation, whole seconds, so never less than 1), and its
``maximum_attestation_interval`` is 5x that (5 s). A shorter quote_interval makes the deadline
shorter than the agent's real pace (1 s + one exchange) and fails healthy agents.
"""

from __future__ import annotations

from typing import Any

import httpx
import sqlalchemy as sa
import trio

from keytrio.actors.agent.push_client import JSON_API
from keytrio.actors.agent.push_loop import PushAttester
from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier.schema import notices
from keytrio.scenarios.runner import Run
from keytrio.testbed.machine import Machine
from keytrio.testbed.world import Testbed

QUOTE_INTERVAL = 1.0
PUSH = {"behind_nat": True, "mode": "push"}


def push_testbed(run: Run, machines: int = 0, **options: Any) -> Any:
    """A testbed with a verifier in mode ``both``; add push machines with ``add_machines(n, **PUSH)``."""
    options.setdefault("quote_interval", QUOTE_INTERVAL)
    return run.testbed(machines=machines, verifier_options={"mode": "both"}, **options)


async def passed(tb: Testbed, m: Machine, after: int = -1, *, timeout: float = 30.0) -> dict[str, Any]:
    """Wait for a passed push attestation of ``m`` with an index above ``after``; returns it."""
    with trio.move_on_after(timeout):
        while True:
            history = await tb.push_attestations(m)
            for a in history:
                if a["index"] > after and a["evaluation"] == "pass":
                    return a
            await trio.sleep(0.1)
    raise AssertionError(f"{m.name}: no passed push attestation after index {after} in {timeout:g} s")


async def last_index(tb: Testbed, m: Machine) -> int:
    return max((a["index"] for a in await tb.push_attestations(m)), default=-1)


async def stored_notices(tb: Testbed, m: Machine) -> list[str]:
    """The event ids of the revocation notices the verifier stored about ``m`` (its outbox)."""
    assert tb.verifier is not None
    agent_id = m.agent_id

    def q(conn: sa.Connection) -> list[str]:
        return list(conn.execute(sa.select(notices.c.event_id).where(notices.c.agent_id == agent_id)).scalars())

    return await tb.verifier.store.read(q)


async def dial_in_refused(address: tuple[str, int]) -> bool:
    """True when a connection to ``address`` is refused or reset before any byte comes back."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(*address)
            async with stream:
                await stream.send_all(b"GET /version HTTP/1.0\r\n\r\n")
                return await stream.receive_some(1) == b""
    except (OSError, trio.BrokenResourceError):
        return True


def attester(m: Machine) -> PushAttester:
    """The running push agent's attestation loop (its token, evidence source and client)."""
    assert m.agent is not None and m.agent.push is not None, f"{m.name}: no push agent running"
    return m.agent.push


async def token_of(m: Machine) -> str:
    """The push agent's current PoP bearer token (waits for its first session)."""
    push = attester(m)
    with trio.fail_after(10):
        while push.token is None:
            await trio.sleep(0.05)
    assert push.token is not None
    return push.token


def v3_client(tb: Testbed) -> httpx.AsyncClient:
    """HTTPS to the verifier's push API as a push agent dials it: the server verified against the
    testbed CA, no client certificate (authentication is the bearer token alone)."""
    assert tb.ca is not None
    return make_client(tls.client_context([tb.ca.ca]), timeout=10)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": JSON_API, "Accept": JSON_API}
