"""Cluster failover: verifier processes on one PostgreSQL share 8 machines; one is killed, one is cut off.

Story: a PostgreSQL database of its own (the local server is started if it is down), three
``keytrio verifier`` processes (same ``verifier_id``, ``cluster = true``, ``lease_ttl`` 3 s,
``quote_interval`` 1 s) and eight machines enrolled with PCR 15 pinned. The three split the eight
by leases. A fourth verifier starts: the share rebalances to at most ceil(8 / 4) = 2 each. Machine
m5 loses its network, m1's PCR 15 changes: m1 fails, and the revocation notice for m5 waits in the
outbox. The verifier delivering the notices is killed with ``kill -9``; m5's network is back. The
survivors take the dead one's agents over (every one attested again within lease_ttl + one
quote_interval of the kill) and one of them delivers the pending notice to m5. Then another
verifier is cut from the database (a proxy that stops forwarding): it stops polling before its
leases expire, and the others take its agents over. The report gives each hand-over time: max
over the agents of (first successful poll by a survivor - last poll by the one that went away).
Expected verdict: m1 Get Quote -> Invalid Quote (``pcr_validation.invalid_pcr_15``); the other
seven end in Get Quote with no event; all eight received the one notice about m1.
"""

from __future__ import annotations

import math

import trio

from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.cluster import Handover, VerifierCluster, Watch, fresh_database, use_verifier
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE, Testbed

SIZE, VICTIM, CUT_OFF = 8, "m1", "m5"
TTL, INTERVAL = 3.0, 1.0
EVENT = "pcr_validation.invalid_pcr_15"
NOTICE = ((VICTIM, EVENT),)
EXPECT = {f"m{i}": Expect(events=(), notices=NOTICE, final=GET_QUOTE) for i in range(SIZE)}
EXPECT[VICTIM] = Expect(events=(EVENT,), notices=NOTICE, states=(GET_QUOTE, INVALID_QUOTE), final=INVALID_QUOTE)
#: rounds of the watch (0.1 s each) a condition may take: a hang guard, not a measurement
ROUNDS = 600


async def until(what: str, cond: object, *, rounds: int = ROUNDS) -> None:
    """Wait for ``cond()`` in bounded rounds of the watch's interval."""
    for _ in range(rounds):
        if cond():  # type: ignore[operator]
            return
        await trio.sleep(0.1)
    Run.check(False, f"not {what} after {rounds} rounds")


def shares(watch: Watch, cluster: VerifierCluster) -> dict[str, int]:
    names = cluster.by_instance()
    out = {m.name: 0 for m in cluster.members.values() if m.alive}
    for holder in watch.latest().holders.values():
        if holder in names and names[holder] in out:
            out[names[holder]] += 1
    return out


def spread(watch: Watch, cluster: VerifierCluster, live: int) -> bool:
    held = shares(watch, cluster)
    return (len(held) == live and sum(held.values()) == SIZE and all(held.values())
            and max(held.values()) <= math.ceil(SIZE / live))


def describe(h: Handover, cluster: VerifierCluster, old: frozenset[str] = frozenset()) -> str:
    """``old``: agents whose last poll predates the event for another reason (left out of the gap)."""
    names = cluster.by_instance()
    who = sorted({names.get(s, s) for _, _, s in h.agents.values()})
    gap = h.gap(old)
    counted = len(set(h.agents) - old)
    shown = (f"hand-over {gap:.2f} s (last poll by it -> first by a survivor, max over {counted} agents)"
             if gap is not None else "hand-over: n/a (no agent of it was being attested)")
    return f"{shown}; all {len(h.agents)} re-attested {h.after_event:.2f} s after the event; by {', '.join(who)}"


@scenario("cluster-failover", expect=EXPECT)
async def cluster_failover(run: Run) -> None:
    async with fresh_database() as db, run.testbed(machines=SIZE, quote_interval=INTERVAL) as tb:
        assert tb.ca is not None
        async with VerifierCluster(run.dir / "cluster", tb.ca, db, lease_ttl=TTL, quote_interval=INTERVAL) as cl:
            await _drill(run, tb, cl, db)


async def _drill(run: Run, tb: Testbed, cl: VerifierCluster, db: str) -> None:
    victim, cut_off = tb.machine(VICTIM), tb.machine(CUT_OFF)
    async with trio.open_nursery() as nursery:
        async with run.step("three verifier processes on one PostgreSQL (cluster = true, lease_ttl 3 s)"):
            for name in ("v1", "v2", "v0"):  # v1 ticks first: it takes the outbox
                await cl.start(name)
            watch = Watch(db, cl)
            await nursery.start(watch.run)
            await use_verifier(tb, cl.members["v0"].url)
            run.note(f"instances: {', '.join(f'{m.name}={m.instance_id[:8]}' for m in cl.members.values())}")

        async with run.step(f"enrol {SIZE} machines (PCR 15 pinned): the three split them"):
            value = (await victim.read_pcrs("sha256", [15]))[15].hex()
            for m in tb.machines:
                await tb.enrol(m, tpm_policy={"15": [value]})
            for m in tb.machines:
                await tb.wait_count(m, 1, timeout=60)
            await until("split among the three", lambda: spread(watch, cl, 3))
            run.note(f"shares: {shares(watch, cl)}")

        async with run.step("a fourth verifier joins: the share rebalances to ceil(8 / 4) = 2 each"):
            await cl.start("v3")
            await until("rebalanced over four", lambda: spread(watch, cl, 4))
            run.note(f"shares: {shares(watch, cl)}")

        async with run.step(f"{CUT_OFF} loses its network, {VICTIM}'s PCR 15 changes: the notice for {CUT_OFF} waits"):
            cut_off.cut_network("refuse")
            await victim.extend_data(15, b"tampered")
            await tb.wait_state(victim, INVALID_QUOTE, timeout=60)
            for m in tb.machines:
                if m is not cut_off:
                    await tb.wait_notices(m, 1, timeout=60)
            run.check(not tb.notices(cut_off), f"{CUT_OFF} cannot have its notice yet")

        holder = cl.by_instance().get(watch.latest().outbox or "", "")
        dead = holder if holder != "v0" else "v1"
        async with run.step(f"kill -9 {dead} (it holds the outbox); {CUT_OFF}'s network is back"):
            instance = cl.members[dead].instance_id
            mine = watch.held_by(instance, watch.latest().t)
            killed = cl.kill(dead)
            cut_off.restore_network()
            run.note(f"{dead} held {len(mine)} agents{' and the outbox' if holder == dead else ''}")

        async with run.step("the survivors attest its agents again within lease_ttl + quote_interval"):
            # the victim is polled by no one any more; CUT_OFF was unreachable until the kill: its
            # last poll is old, so it counts for the re-attestation but not for the hand-over gap
            skip = frozenset({victim.agent_id})
            await until("taken over", lambda: watch.handover(instance, killed, skip) is not None)
            h = watch.handover(instance, killed, skip)
            assert h is not None
            run.note(describe(h, cl, frozenset({cut_off.agent_id})))
            # the bound holds up to one poll's duration; on a host loaded by other work a poll can
            # take seconds: the figure is reported against the bound, the check only catches a
            # take-over that did not happen in the lease's time at all
            within = "within" if h.after_event <= TTL + INTERVAL else "over"
            run.note(f"{within} the bound lease_ttl + quote_interval = {TTL + INTERVAL:g} s")
            run.check(h.after_event <= 2 * (TTL + INTERVAL),
                      f"re-attested {h.after_event:.2f} s after the kill (bound {TTL + INTERVAL:g} s)")
            await until("spread over the three survivors", lambda: spread(watch, cl, 3))
            run.note(f"shares: {shares(watch, cl)}")

        async with run.step(f"a survivor delivers the dead one's pending notice to {CUT_OFF}"):
            notices = await tb.wait_notices(cut_off, 1, timeout=60)
            about = tb.by_agent_id(str(notices[0].get("agent_id", "")))
            run.note(f"{CUT_OFF}: the notice about {about}, delivered after {dead}'s death")
            run.check(about == VICTIM, f"{CUT_OFF} got a notice about {about}")

        cut = next(n for n in ("v1", "v2", "v3") if n != dead)
        async with run.step(f"{cut} is cut from the database: it stops polling before its leases expire"):
            instance = cl.members[cut].instance_id
            before = watch.latest()
            mine = {a for a, h_ in before.holders.items() if h_ == instance}
            expiry = min(before.expires[a] for a in mine)
            cut_at = cl.cut(cut, "blackhole")
            skip = frozenset({victim.agent_id})  # failed: polled by no one
            await until("taken over", lambda: watch.handover(instance, cut_at, skip) is not None)
            h = watch.handover(instance, cut_at, skip)
            assert h is not None
            await trio.sleep(1.0)  # one more round of the counters (no verdict rests on it)
            last = watch.last_poll(cut)
            first = min((first for _, first, _ in h.agents.values()), default=cut_at + TTL)
            run.check(last is not None and last < expiry,
                      f"{cut} last polled at {last} and its leases expired at {expiry:.2f}")
            assert last is not None
            run.check(watch.polls_after(cut, first) == 0, f"{cut} polled after a survivor took over")
            # its monitors may also stall on their hung writes; the fence is what stops them for sure
            fenced = cl.fenced_at(cut, cut_at)
            run.check(fenced is not None and fenced < expiry, f"{cut}'s fence fired at {fenced}, leases expired at {expiry:.2f}")
            assert fenced is not None
            run.note(f"{cut}'s fence stopped its monitors {expiry - fenced:.2f} s before its leases expired")
            run.note(f"{cut} stopped polling {expiry - last:.2f} s before its leases expired "
                     f"({len(mine)} agents); no poll by it after the take-over")
            run.note(describe(h, cl))

        async with run.step("every machine but the victim is still attested"):
            counts = {m.name: (await tb.get(m) or {})["attestation_count"] for m in tb.machines if m is not victim}
            for m in tb.machines:
                if m is not victim:
                    await tb.wait_count(m, counts[m.name] + 1, timeout=60)
        nursery.cancel_scope.cancel()

