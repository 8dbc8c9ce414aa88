"""Backoff on trio's MockClock: the verifier's exponential retry of an unreachable agent and the
revocation outbox's doubling redelivery, both measured in mock seconds on a real Verifier actor
(SQLite, mTLS client, real TCP), never with sleeps or the wall clock.

The "agent" and the webhook are closed doors: TCP listeners that note the (mock) time of every
connection and hang up, which both the monitor and the outbox treat as "unreachable, retry".
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.verifier import records
from keytrio.actors.verifier.monitor import COMM_ERROR
from tests.actors.verifier_support import enrol, enrol_body, start_verifier
from tests.protocol.tpm2_support import ak_public

AGENT_ID = "0b0ff000-0000-4000-8000-00000000000b"


@pytest.fixture
def clock() -> MockClock:
    # Jumps only after 0.3 s of real idleness: real sockets and SQLite threads finish before the
    # clock moves, so every gap measured below is a sleep of the code under test.
    return MockClock(autojump_threshold=0.3)


@dataclass
class ClosedDoor:
    """A TCP listener that records when each connection came (mock time) and closes it."""

    times: list[float] = field(default_factory=list)
    port: int = 0
    _arrived: trio.Event = field(default_factory=trio.Event)

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.times.append(trio.current_time())
        self._arrived.set()
        await stream.aclose()

    async def wait_for(self, count: int) -> list[float]:
        with trio.fail_after(600):  # mock seconds: a hang guard only
            while len(self.times) < count:
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self.times[:count]


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_unreachable_agent_exponential_retries_then_doubling_notice_redelivery(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    agent, hook = ClosedDoor(), ClosedDoor()
    await nursery.start(agent.run)
    await nursery.start(hook.run)
    rv = await start_verifier(
        nursery, pki, tmp_path / "verifier", clock=clock.current_time,
        retry_interval=2.0, max_retries=3, exponential_backoff=True,
        revocation_max_retry_interval=8.0, revocation_notice_ttl=3600.0,
        webhook_url=f"http://127.0.0.1:{hook.port}/hook",
    )  # fmt: skip
    fake = SimpleNamespace(agent_id=AGENT_ID)
    await enrol(rv, AGENT_ID, enrol_body(
        fake, v=os.urandom(32), address=("127.0.0.1", agent.port),  # type: ignore[arg-type]
        ak_public=ak_public().marshal(), mtls_cert=pki.agent.pem,
    ))  # fmt: skip

    # the monitor: first poll, then retries after retry_interval ** n = 2, 4, 8 s; after
    # max_retries (3) the agent is FAILED with comm_error
    polls = await agent.wait_for(4)
    assert gaps(polls) == [2.0, 4.0, 8.0], polls
    rec = await rv.wait(AGENT_ID, lambda r: r["operational_state"] == records.FAILED)
    assert rec["last_event_id"] == COMM_ERROR, rec

    # the outbox: the comm_error notice goes to the webhook at once, then again after 2, 4, 8 and
    # 8, 8 s (doubling from retry_interval, capped at revocation_max_retry_interval)
    deliveries = await hook.wait_for(6)
    assert deliveries[0] == polls[-1], (polls, deliveries)  # staged with the failure, sent at once
    assert gaps(deliveries) == [2.0, 4.0, 8.0, 8.0, 8.0], deliveries
    # ... and to the failing agent itself (a recipient like every agent of this verifier)
    to_agent = (await agent.wait_for(4 + 6))[4:]
    assert gaps(to_agent) == [2.0, 4.0, 8.0, 8.0, 8.0], to_agent
    await rv.stop()


async def test_linear_retries_without_exponential_backoff(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    agent = ClosedDoor()
    await nursery.start(agent.run)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", clock=clock.current_time,
                              retry_interval=3.0, max_retries=4, exponential_backoff=False)
    body = enrol_body(SimpleNamespace(agent_id=AGENT_ID), v=os.urandom(32),  # type: ignore[arg-type]
                      address=("127.0.0.1", agent.port), ak_public=ak_public().marshal(), mtls_cert=pki.agent.pem)
    await enrol(rv, AGENT_ID, body)
    polls = await agent.wait_for(5)
    assert gaps(polls) == [3.0, 3.0, 3.0, 3.0], polls
    rec = await rv.wait(AGENT_ID, lambda r: r["operational_state"] == records.FAILED)
    assert rec["last_event_id"] == COMM_ERROR, rec
    await rv.stop()
