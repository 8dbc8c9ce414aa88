"""Cluster mode: verifiers on one PostgreSQL share the agents of their ``verifier_id`` by leases.

Opt-in (``[verifier] cluster = true``, PostgreSQL only). Each running verifier is one *instance*
(a random id) of its ``verifier_id``; the instances of one ``verifier_id`` split its agents:

- **Leases** (table ``verifier_leases``): one row per agent (kind ``agent``) plus one for the
  revocation outbox (kind ``outbox``). A row has a holder instance, an ``expires_at`` (the holder's
  wall clock + ``lease_ttl``) and an ``epoch`` that grows by one at every claim (a fencing token:
  a higher epoch is a later holder). Rows are claimed with PostgreSQL's own row locks,
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (two instances never claim the same row; none waits on
  another's claim), and renewed with an ``UPDATE ... WHERE holder = me`` (a renewal racing a
  claim of an expired row is re-checked by PostgreSQL after the claim commits, and loses).
- **Members** (table ``verifier_members``): every tick upserts this instance's heartbeat; rows past
  their expiry are deleted. The live members give the fair share ``ceil(agents / live)``: an
  instance never claims past it and releases what it holds beyond it (after stopping those
  monitors), so a joining instance gets its share within two ticks.
- **Fencing**: the renewal's transaction starts at local monotonic time ``t0``; while the last
  committed renewal is younger than ``lease_ttl - margin`` on this instance's own clock it may
  poll. Past that (the database is gone or hangs), a separate task stops every monitor and the
  outbox delivery *before* the leases expire for the others. Wall clocks of the hosts must agree
  within ``margin`` (NTP), as the others compare ``expires_at`` with their own wall clock.
- **Epoch-fenced writes**: the timing fence above depends on clocks and on a paused process
  noticing; the database does not. A monitor is started under ``records.Fence(instance, epoch of
  the claim)`` and each of its writes (success with counters and IMA progress, failure with its
  notice, state changes) carries ``EXISTS (lease row: holder = me AND epoch = E)`` in its own
  WHERE (records.py). An instance paused or partitioned past its lease writes nothing once another
  instance claimed the agent (the claim raised the epoch): counters and progress never go back.
  A monitor whose lease was re-claimed at a new epoch is restarted under the new one.
- **Hand-over**: a dead instance's leases and heartbeat expire ``lease_ttl`` after its last
  renewal; the survivors' next tick (every ``renew_interval`` <= ``quote_interval``) claims them,
  and a monitor polls at once when it starts: its agents are polled again within
  ``lease_ttl + quote_interval``.
- **Outbox**: the holder of the outbox lease runs the durable notifier (notify.py) of the whole
  ``verifier_id``: the pending deliveries a dead instance staged are delivered by a survivor.

The instance holding an agent's lease runs its monitor while the agent is in an active state
(pull agents), or its liveness deadline (push agents, :class:`PushTimers`: they may send their
evidence to any instance, which verifies and records it; only the holder fails a silent one);
routes on any instance just ``kick`` the next tick. A clean shutdown releases every lease and
the heartbeat, so the others take over at their next tick.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
import trio
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.push.timer import Deadlines
from keytrio.actors.verifier.schema import agents, leases, members

log = logging.getLogger("keytrio.verifier.leases")

AGENT = "agent"
OUTBOX = "outbox"
#: the operational states a monitor runs in (as monitor.ACTIVE_STATES)
ACTIVE = (records.START, records.GET_QUOTE, records.GET_QUOTE_RETRY, records.PROVIDE_V, records.PROVIDE_V_RETRY)


class Monitors(Protocol):
    """What the cluster drives: the verifier's MonitorSet."""

    @property
    def running(self) -> set[str]: ...

    def start(self, agent_id: str) -> None: ...

    def stop(self, agent_id: str) -> None: ...


@dataclass
class Tick:
    """What one renewal transaction found: the leases held now and the agents to monitor."""

    held: set[str] = field(default_factory=set)
    epochs: dict[str, int] = field(default_factory=dict)  # held agent -> the epoch of our claim
    active: set[str] = field(default_factory=set)  # held pull agents in an active state
    push_active: set[str] = field(default_factory=set)  # held push agents in an active state
    outbox: bool = False
    release: set[str] = field(default_factory=set)  # held beyond the fair share: to give back
    live: int = 1
    share: int = 0


class Cluster:
    """``await nursery.start(cluster.run)``: claim, renew and fence this instance's leases."""

    def __init__(
        self,
        store: Store,
        *,
        verifier_id: str,
        monitors: Monitors,
        push: Monitors | None = None,
        outbox: Callable[..., Awaitable[Any]] | None = None,
        ttl: float = 15.0,
        renew_interval: float | None = None,
        margin: float | None = None,
        clock: Callable[[], float] = time.time,
        instance_id: str | None = None,
    ) -> None:
        self.store = store
        self.verifier_id = verifier_id
        self.instance_id = instance_id or uuid.uuid4().hex
        self.monitors = monitors
        self.push = push  # the push agents' liveness timers (PushTimers), mode push/both
        self._outbox = outbox  # an async run(task_status=...) of the notifier
        self.ttl = ttl
        self.renew_interval = renew_interval if renew_interval is not None else ttl / 3
        #: stop polling this long before the leases expire (own clock): covers a renewal's latency
        self.margin = margin if margin is not None else max(ttl / 5, 0.1)
        if not 0 < self.renew_interval < ttl - self.margin:
            raise ValueError("renew_interval must be > 0 and below lease_ttl - margin")
        self._clock = clock
        self.held: set[str] = set()  # agent leases held (as of the last committed renewal)
        self._epochs: dict[str, int] = {}  # running monitor -> the epoch it was started under
        self.holds_outbox = False
        self.valid_until = -math.inf  # trio time: polling stops here unless renewed
        self.fenced = 0  # times the fence fired (for tests and logs)
        self.last: Tick | None = None
        self._kick = trio.Event()
        self._renewed = trio.Event()
        self._outbox_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    def kick(self, *_args: Any) -> None:
        """Tick soon (a route enrolled, stopped, reactivated or deleted an agent)."""
        self._kick.set()

    def hooks(self, forget: Callable[[str], Awaitable[None]] | None = None) -> ClusterHooks:
        """The enrolment API's hooks (routes_agents.AgentHooks) in cluster mode; ``forget``: what
        a delete removes besides the row (push agents' sessions and history)."""
        return ClusterHooks(self, forget)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick every ``renew_interval`` (or when kicked) until cancelled; started after the first."""
        log.info("event=cluster.joined instance=%s verifier_id=%s lease_ttl=%g renew_interval=%g",
                 self.instance_id, self.verifier_id, self.ttl, self.renew_interval)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.guard)
            started = False
            while True:
                self._kick = trio.Event()
                # fixed rate: a slow renewal (a loaded host) does not push the next one later, so
                # renewals stay renew_interval apart and the fence does not fire on a live database
                due = trio.current_time() + self.renew_interval
                try:
                    await self.tick()
                except Exception:  # the database is unreachable: the fence decides, retry
                    log.warning("event=cluster.renew_failed instance=%s", self.instance_id, exc_info=True)
                if not started:
                    task_status.started()
                    started = True
                with trio.move_on_at(due):
                    await self._kick.wait()

    async def guard(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The fence and the outbox delivery; on exit everything stops and the leases are given back.

        ``run`` starts it; tests start it alone and call :meth:`tick` themselves.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._fence)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._drop_all("shutdown")
            self.held = set()
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                for attempt in (1, 2, 3):  # PostgreSQL ends one side of a deadlock: try again
                    try:
                        await self.store.write(self._leave)
                        break
                    except sa.exc.OperationalError as exc:
                        if attempt == 3:  # the others take over when the leases expire instead
                            log.warning("event=cluster.leave_failed instance=%s error=%s", self.instance_id,
                                        str(exc).splitlines()[0][:200])
                    except Exception:
                        log.warning("event=cluster.leave_failed instance=%s", self.instance_id, exc_info=True)
                        break

    async def tick(self) -> Tick:
        """One renewal: heartbeat, renew, claim up to the fair share, release beyond it, apply."""
        t0 = trio.current_time()
        now = self._clock()
        t = await self.store.write(lambda conn: self._renew(conn, now))
        if trio.current_time() >= t0 + self.ttl - self.margin:
            # committed too late to trust: the fence has (or will have) stopped everything
            log.warning("event=cluster.renew_late instance=%s", self.instance_id)
            return t
        self.valid_until = t0 + self.ttl - self.margin
        self._renewed.set()
        self._renewed = trio.Event()
        gained, lost = t.held - self.held, self.held - t.held
        if gained or lost:
            log.info("event=cluster.leases instance=%s held=%d gained=%d lost=%d live=%d share=%d",
                     self.instance_id, len(t.held), len(gained), len(lost), t.live, t.share)
        self.held = set(t.held)
        self._apply(t.active - t.release, t.push_active - t.release, t.outbox, t.epochs)
        if t.release:
            # monitors stopped above first: the next holder never overlaps our polls
            ids = sorted(t.release)
            await self.store.write(lambda conn: self._release(conn, ids))
            self.held -= t.release
        self.last = t
        return t

    def _sets(self) -> list[Monitors]:
        return [self.monitors] if self.push is None else [self.monitors, self.push]

    def _running(self) -> set[str]:
        return set().union(*(m.running for m in self._sets()))

    def _apply(self, active: set[str], push_active: set[str], outbox: bool, epochs: dict[str, int]) -> None:
        for monitors, want in zip(self._sets(), (active, push_active), strict=False):
            for aid in monitors.running:
                if aid not in want or self._epochs.get(aid) != epochs.get(aid):
                    monitors.stop(aid)  # lost, released, inactive, or re-claimed since it started
            for aid in sorted(want - monitors.running):
                # the monitor's task inherits the fence: its writes apply only under this claim
                with records.fenced(records.Fence(self.instance_id, epochs[aid])):
                    monitors.start(aid)
                self._epochs[aid] = epochs[aid]
        if outbox and self._outbox_scope is None and self._outbox is not None and self._nursery is not None:
            self._outbox_scope = trio.CancelScope()
            self._nursery.start_soon(self._run_outbox, self._outbox_scope)
        elif not outbox:
            self._stop_outbox()
        self.holds_outbox = outbox

    async def _run_outbox(self, scope: trio.CancelScope) -> None:
        assert self._outbox is not None
        with scope:
            await self._outbox()

    def _stop_outbox(self) -> None:
        if self._outbox_scope is not None:
            self._outbox_scope.cancel()
            self._outbox_scope = None

    def _drop_all(self, why: str) -> None:
        running = self._running()
        if running or self._outbox_scope is not None:
            log.warning("event=cluster.fenced instance=%s why=%s monitors=%d", self.instance_id, why,
                        len(running))
        for monitors in self._sets():
            for aid in list(monitors.running):
                monitors.stop(aid)
        self._stop_outbox()
        self.holds_outbox = False

    async def _fence(self) -> None:
        while True:
            await trio.sleep_until(self.valid_until)
            if trio.current_time() >= self.valid_until:
                if self._running() or self._outbox_scope is not None:
                    self.fenced += 1
                self._drop_all("lease_unrenewed")
                self.held = set()
                await self._renewed.wait()

    # --- transactions (worker thread) ---------------------------------------------------------

    def _renew(self, conn: Connection, now: float) -> Tick:
        vid, me, exp = self.verifier_id, self.instance_id, now + self.ttl
        up = pg_insert(members).values(instance_id=me, verifier_id=vid, expires_at=exp)
        conn.execute(up.on_conflict_do_update(index_elements=["instance_id"], set_={"expires_at": exp}))
        conn.execute(sa.delete(members).where(members.c.verifier_id == vid, members.c.expires_at < now))
        live = conn.execute(sa.select(sa.func.count()).select_from(members)
                            .where(members.c.verifier_id == vid)).scalar_one()
        # a lease row for every agent of this verifier_id (and the outbox); none for deleted ones
        mine = sa.select(agents.c.agent_id).where(agents.c.verifier_id == vid)
        # only rows that do not exist yet (seen in this statement's snapshot): an INSERT ... ON
        # CONFLICT on a row another transaction is renewing waits for that transaction, and two
        # instances doing so (one leaving, one ticking) deadlocked
        missing = ~sa.exists(sa.select(sa.literal_column("1")).select_from(leases).where(
            leases.c.kind == AGENT, leases.c.name == agents.c.agent_id))
        conn.execute(pg_insert(leases).from_select(
            ["kind", "name", "verifier_id", "holder", "expires_at", "epoch"],
            sa.select(sa.literal(AGENT), agents.c.agent_id, sa.literal(vid), sa.null(), sa.literal(0.0),
                      sa.literal(0)).where(agents.c.verifier_id == vid, missing),
        ).on_conflict_do_nothing())
        has_box = conn.execute(sa.select(leases.c.name).where(leases.c.kind == OUTBOX, leases.c.name == vid)).first()
        if has_box is None:
            conn.execute(pg_insert(leases).values(kind=OUTBOX, name=vid, verifier_id=vid, holder=None,
                                                  expires_at=0.0, epoch=0).on_conflict_do_nothing())
        conn.execute(sa.delete(leases).where(leases.c.kind == AGENT, leases.c.verifier_id == vid,
                                             leases.c.name.not_in(mine)))
        group = sa.and_(leases.c.verifier_id == vid, leases.c.kind == AGENT)
        epochs = {n: int(e) for n, e in conn.execute(
            sa.update(leases).where(group, leases.c.holder == me).values(expires_at=exp)
            .returning(leases.c.name, leases.c.epoch))}
        held = set(epochs)
        total = conn.execute(sa.select(sa.func.count()).select_from(leases).where(group)).scalar_one()
        share = math.ceil(total / max(live, 1))
        release: set[str] = set()
        if len(held) > share:
            release = set(sorted(held)[share:])
        elif len(held) < share:
            free = list(conn.execute(
                sa.select(leases.c.name)
                .where(group, sa.or_(leases.c.holder.is_(None), leases.c.expires_at < now))
                .order_by(leases.c.name).limit(share - len(held))
                .with_for_update(skip_locked=True)).scalars())
            if free:
                epochs.update((n, int(e)) for n, e in conn.execute(
                    sa.update(leases).where(group, leases.c.name.in_(free))
                    .values(holder=me, expires_at=exp, epoch=leases.c.epoch + 1)
                    .returning(leases.c.name, leases.c.epoch)))
                held |= set(free)
        box = sa.and_(leases.c.kind == OUTBOX, leases.c.name == vid)
        outbox = conn.execute(sa.update(leases).where(box, leases.c.holder == me).values(expires_at=exp)
                              .returning(leases.c.name)).first() is not None
        if not outbox:
            free_box = conn.execute(
                sa.select(leases.c.name).where(box, sa.or_(leases.c.holder.is_(None), leases.c.expires_at < now))
                .with_for_update(skip_locked=True)).first()
            if free_box is not None:
                conn.execute(sa.update(leases).where(box).values(holder=me, expires_at=exp,
                                                                 epoch=leases.c.epoch + 1))
                outbox = True
        active: set[str] = set()
        push_active: set[str] = set()
        if held:
            for aid, ip in conn.execute(
                    sa.select(agents.c.agent_id, agents.c.ip).where(agents.c.agent_id.in_(sorted(held)),
                                                                    agents.c.operational_state.in_(ACTIVE))):
                (active if ip is not None else push_active).add(aid)  # push agents: no contact address
        return Tick(held=held, epochs=epochs, active=active, push_active=push_active, outbox=outbox,
                    release=release, live=int(live), share=share)

    def _release(self, conn: Connection, ids: list[str]) -> None:
        conn.execute(sa.update(leases).where(leases.c.kind == AGENT, leases.c.verifier_id == self.verifier_id,
                                             leases.c.holder == self.instance_id, leases.c.name.in_(ids))
                     .values(holder=None, expires_at=0.0))

    def _leave(self, conn: Connection) -> None:
        # members first, then leases: the order a tick takes its locks in (the other order
        # deadlocked two workers stopping together)
        conn.execute(sa.delete(members).where(members.c.instance_id == self.instance_id))
        conn.execute(sa.update(leases).where(leases.c.verifier_id == self.verifier_id,
                                             leases.c.holder == self.instance_id)
                     .values(holder=None, expires_at=0.0))


class ClusterHooks:
    """Routes on any instance: stop a monitor (or push timer) running here at once, let the lease
    holder decide."""

    def __init__(self, cluster: Cluster, forget: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.cluster = cluster
        self._forget = forget  # a deleted push agent's sessions and history (push/store.py)

    def _stop_here(self, agent_id: str) -> None:
        for monitors in self.cluster._sets():
            monitors.stop(agent_id)

    def on_enrolled(self, agent_id: str) -> None:
        self.cluster.kick()

    async def on_deleted(self, agent_id: str) -> None:
        self._stop_here(agent_id)
        self.cluster.kick()
        if self._forget is not None:
            await self._forget(agent_id)

    def on_stop(self, agent_id: str) -> None:
        self._stop_here(agent_id)
        self.cluster.kick()

    def on_reactivate(self, agent_id: str) -> None:
        # the route reset the row; the holder's next tick starts a fresh monitor (or timer)
        self._stop_here(agent_id)
        self.cluster.kick()


def _never(agent_id: str) -> bool:
    return False


class PushTimers:
    """Cluster mode, push agents: the holder of an agent's lease runs its liveness deadline.

    Push agents send their evidence to any instance, which verifies it and records it in the
    agent's row (``last_received_quote``); no instance arms a deadline on evidence arrival
    (``Deadlines.gate`` refuses all but these). The holder arms one when it claims the lease (a
    full ``max_interval`` from the claim: a survivor never fails an agent for the time it spent
    taking over) and, when it passes, re-reads the row: evidence received meanwhile (by any
    instance) moves the deadline to ``last_received_quote + max_interval``; none fails the agent
    (push/verify.py ``timed_out``), a write fenced by this claim, so two instances never both fail
    or notify.
    """

    def __init__(self, store: Store, nursery: trio.Nursery, *, service_deadlines: Deadlines, max_interval: float,
                 timed_out: Callable[[str], Awaitable[None]], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_interval = max_interval
        self._timed_out = timed_out
        self._clock = clock
        self._held: set[str] = set()
        self.deadlines = Deadlines(nursery, self.expired)  # on expiry: the re-check below
        service_deadlines.gate = _never  # evidence arrival arms nothing: only the holder's timer runs

    @property
    def running(self) -> set[str]:
        return set(self._held)

    def start(self, agent_id: str) -> None:
        self._held.add(agent_id)
        self.deadlines.arm(agent_id, self.max_interval)  # its task inherits the claim's fence

    def stop(self, agent_id: str) -> None:
        self._held.discard(agent_id)
        self.deadlines.disarm(agent_id)

    async def expired(self, agent_id: str) -> None:
        row = await records.get(self.store, agent_id)
        if agent_id not in self._held or row is None or row["operational_state"] not in ACTIVE:
            self._held.discard(agent_id)
            return
        # whole seconds stored: one more second of slack, never an early failure
        left = (row["last_received_quote"] or 0) + 1 + self.max_interval - self._clock()
        if left > 0:
            self.deadlines.arm(agent_id, left)  # from this task: the fence is inherited again
            return
        self._held.discard(agent_id)
        await self._timed_out(agent_id)
