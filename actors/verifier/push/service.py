"""The verifier's push model (API v3.0) service: sessions, attestations, verification, deadlines.

One :class:`PushService` per verifier, living in the verifier's nursery: verifications that are
not done in the evidence transaction (verify.Verifier.settle: a steady-state pass) run there after
the 202 (``start_soon``), and so do the agents' deadline tasks (timer.py). A push agent is
an enrolled agent without a contact address (``ip`` NULL). :meth:`PushService.resume` runs at
start-up: every active push agent gets a deadline a full interval away (the time the verifier was
down does not count against an agent that could not reach it), and evidence that was accepted but not verified when the previous process stopped is
verified now (nothing acknowledged is lost).

:class:`Hooks` routes the enrolment API's hooks: pull agents to the monitors, push agents here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.monitor import ACTIVE_STATES, ImaCheckFactory, MonitorSet
from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.push.attestations import (
    Accepted,
    Admit,
    Attestations,
    CycleSettings,
    retry_after,
)
from keytrio.actors.verifier.push.sessions import Sessions, SessionSettings, parse_bearer, token_error
from keytrio.actors.verifier.push.timer import Deadlines
from keytrio.actors.verifier.push.verify import Verifier
from keytrio.protocol.push_wire import WireError

log = logging.getLogger("keytrio.verifier")

#: maximum_attestation_interval = this x quote_interval (upstream's push monitor; GET agents shows it)
MAX_INTERVAL_FACTOR = 5


@dataclass(frozen=True)
class PushSettings:
    quote_interval: float = 2.0
    session_lifetime: float = 180.0
    challenge_lifetime: float = 60.0
    evidence_lifetime: float = 1800.0
    history: int = 10

    @property
    def max_interval(self) -> float:
        # Counted in the whole seconds agents are told to wait (seconds_to_next_attestation):
        # a 0.3 s interval tells them 1 s, and a 1.5 s deadline then failed healthy agents.
        return retry_after(self.quote_interval) * MAX_INTERVAL_FACTOR


def is_push(row: dict[str, Any]) -> bool:
    return row.get("ip") is None


class PushService:
    def __init__(
        self,
        store: Store,
        *,
        verifier_id: str,
        nursery: trio.Nursery,
        settings: PushSettings,
        notifier: Any,
        ima_check_for: ImaCheckFactory | None,
        clock: Callable[[], float] = time.time,
        policy_ready: Callable[[str | None, str | None], Awaitable[None]] | None = None,
        policy_loaded: Callable[[str | None, str | None], bool] | None = None,
    ) -> None:
        self.store = store
        self.verifier_id = verifier_id
        self.settings = settings
        self.clock = clock
        self._nursery = nursery
        self.sessions = Sessions(store, SessionSettings(settings.challenge_lifetime, settings.session_lifetime), clock)
        self.verifier = Verifier(store, notifier=notifier, ima_check_for=ima_check_for, clock=clock,
                                 session_lifetime=settings.session_lifetime, max_interval=settings.max_interval,
                                 policy_ready=policy_ready, policy_loaded=policy_loaded)
        # one kept state per agent, shared by the capabilities phase (what to ask for) and the check
        self.attestations = Attestations(
            store, CycleSettings(settings.quote_interval, settings.evidence_lifetime, settings.history), clock,
            self.verifier.states)
        # a steady-state cycle is checked, and its pass written, in its evidence transaction
        self.attestations.settle = self.verifier.settle
        self.deadlines = Deadlines(nursery, self.verifier.timed_out)
        self.verifier.on_failed = self.deadlines.disarm

    async def push_agent(self, agent_id: str) -> dict[str, Any]:
        """The enrolled push agent's row; 404 when not enrolled, 403 for a pull agent."""
        row = await records.get(self.store, agent_id)
        err = self._not_push_agent(row, agent_id)
        if err is not None:
            raise err
        assert row is not None
        return row

    def _not_push_agent(self, row: dict[str, Any] | None, agent_id: str) -> WireError | None:
        if row is None or row["verifier_id"] != self.verifier_id:
            return WireError(404, f"agent {agent_id} not found")
        if not is_push(row):
            return WireError(403, "the agent is enrolled for pull-mode attestation")
        return None

    def admit(self, authorization: str | None, agent_id: str, action: str) -> Admit:
        """The attestation cycle's gate, run inside its transaction: the agent's own valid token
        (a missing or malformed one is refused here, before any database work), then its
        enrolment as a push agent of this verifier."""
        bearer = parse_bearer(authorization, action)
        now = self.clock()

        def check(conn: Connection) -> dict[str, Any] | WireError:
            # one statement for both rows: the token is still judged before the agent
            session, row = pstore.session_and_agent(conn, bearer.session_id, agent_id)
            err = token_error(session, bearer, agent_id, action, now)
            if err is not None:
                return err
            return self._not_push_agent(row, agent_id) or row  # type: ignore[return-value]

        return check

    def evidence_accepted(self, accepted: Accepted) -> None:
        """The 202 is on its way: the agent is alive, and its evidence gets verified (a pass found
        in the evidence transaction is already written: nothing more to run for it)."""
        agent_id = accepted.row["agent_id"]
        self.deadlines.arm(agent_id, self.settings.max_interval)
        settled = accepted.settled
        if settled is not None and settled.passed:
            self.verifier.committed(accepted.row, accepted.res["index"], settled)
            return
        self._nursery.start_soon(self.verifier.run, agent_id, accepted.res["index"], accepted)

    def _arm_from(self, agent_id: str, since: float) -> None:
        self.deadlines.arm(agent_id, since + self.settings.max_interval - self.clock())

    async def enrolled(self, agent_id: str) -> None:
        self._arm_from(agent_id, self.clock())

    async def resume(self) -> int:
        """Deadlines of the active push agents, and verification of evidence left unverified.

        Each agent gets a full interval from now: it could not reach a stopped verifier, so the
        time the verifier was down does not count against it."""
        count = 0
        for row in await records.list_all(self.store, self.verifier_id):
            if is_push(row) and row["operational_state"] in ACTIVE_STATES:
                self._arm_from(row["agent_id"], self.clock())
                count += 1
        for agent_id, index in await pstore.evaluating(self.store, self.verifier_id):
            log.info("agent=%s event=push_verification_resumed index=%d", agent_id, index)
            self._nursery.start_soon(self.verifier.run, agent_id, index)
        return count

    def stop_all(self) -> None:
        self.deadlines.disarm_all()


class Hooks:
    """The enrolment API's hooks for a verifier that serves push agents (and maybe pull agents)."""

    def __init__(self, monitors: MonitorSet, push: PushService) -> None:
        self.monitors = monitors
        self.push = push

    async def on_enrolled(self, agent_id: str) -> None:
        row = await records.get(self.push.store, agent_id)
        if row is None:
            return
        if is_push(row):
            await self.push.enrolled(agent_id)
        else:
            self.monitors.start(agent_id)

    async def on_deleted(self, agent_id: str) -> None:
        self.monitors.stop(agent_id)
        self.push.deadlines.disarm(agent_id)
        self.push.verifier.states.forget(agent_id)
        await pstore.forget_agent(self.push.store, agent_id)

    def on_stop(self, agent_id: str) -> None:
        self.monitors.stop(agent_id)
        self.push.deadlines.disarm(agent_id)
        self.push.verifier.states.forget(agent_id)

    async def on_reactivate(self, agent_id: str) -> None:
        row = await records.get(self.push.store, agent_id)
        if row is None:
            return
        if is_push(row):
            await self.push.enrolled(agent_id)  # a fresh interval from now
        else:
            await self.monitors.reactivate(agent_id)
