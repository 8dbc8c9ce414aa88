"""Event-driven liveness of push agents: one trio deadline per agent, no polling loop.

:meth:`Deadlines.arm` (re)sets an agent's deadline: the first call starts a task that waits in a
cancel scope whose ``deadline`` is the agent's; later calls only move that deadline (evidence
arrived: the agent is alive). When the deadline passes, the task runs ``on_expired(agent_id)``
once and ends. :meth:`Deadlines.disarm` (agent stopped, deleted, failed) cancels the task. The
deadlines are on trio's clock, so tests drive them with MockClock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("keytrio.verifier")


class Deadlines:
    """The deadlines of one verifier's push agents (lives in the verifier's nursery)."""

    def __init__(self, nursery: trio.Nursery, on_expired: Callable[[str], Awaitable[None]]) -> None:
        self._nursery = nursery
        self._on_expired = on_expired
        #: agent -> (the task's outer scope, for disarm; its timer scope, whose deadline moves)
        self._armed: dict[str, tuple[trio.CancelScope, trio.CancelScope]] = {}
        #: cluster mode (leases.PushTimers): False = not this instance's agent, arm nothing
        self.gate: Callable[[str], bool] | None = None

    @property
    def armed(self) -> set[str]:
        return set(self._armed)

    def deadline(self, agent_id: str) -> float | None:
        """The agent's deadline on trio's clock, None when not armed."""
        entry = self._armed.get(agent_id)
        return entry[1].deadline if entry is not None else None

    def arm(self, agent_id: str, seconds: float) -> None:
        """Fail ``agent_id`` unless :meth:`arm` or :meth:`disarm` is called within ``seconds``."""
        if self.gate is not None and not self.gate(agent_id):
            return
        at = trio.current_time() + max(seconds, 0.0)
        entry = self._armed.get(agent_id)
        if entry is not None and not entry[1].cancel_called:
            entry[1].deadline = at
            return
        stop, timer = trio.CancelScope(), trio.CancelScope(deadline=at)
        self._armed[agent_id] = (stop, timer)
        self._nursery.start_soon(self._watch, agent_id, stop, timer)

    def disarm(self, agent_id: str) -> None:
        entry = self._armed.pop(agent_id, None)
        if entry is not None:
            entry[0].cancel()

    def disarm_all(self) -> None:
        for agent_id in list(self._armed):
            self.disarm(agent_id)

    async def _watch(self, agent_id: str, stop: trio.CancelScope, timer: trio.CancelScope) -> None:
        try:
            with stop:
                with timer:
                    await trio.sleep_forever()
                if self._armed.get(agent_id, (None, None))[1] is timer:
                    del self._armed[agent_id]
                try:
                    await self._on_expired(agent_id)
                except Exception:  # one agent's failure record must not take the verifier down
                    log.exception("agent=%s event=push_timeout_handler_failed", agent_id)
        finally:
            if self._armed.get(agent_id, (None, None))[1] is timer:
                del self._armed[agent_id]
