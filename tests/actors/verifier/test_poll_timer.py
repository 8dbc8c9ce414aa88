"""The monitors' shared timer (actors/verifier/poll_timer.py) on trio's MockClock: every sleeper
wakes at its deadline (at most ``slack`` later), a cancelled one at once, and the timer's task
ends with the last sleeper so that the nursery can close."""

import trio
import trio.testing

from keytrio.actors.verifier.poll_timer import PollTimer


async def test_sleepers_wake_in_order_within_slack(autojump_clock: trio.testing.MockClock) -> None:
    woke: dict[int, float] = {}
    deadlines = {i: 1.0 + (i * 7 % 10) * 0.013 for i in range(10)}
    start = trio.current_time()
    async with trio.open_nursery() as n:
        timer = PollTimer(n, slack=0.05)

        async def sleeper(i: int) -> None:
            await timer.sleep_until(start + deadlines[i])
            woke[i] = trio.current_time() - start

        for i in deadlines:
            n.start_soon(sleeper, i)
    assert set(woke) == set(deadlines)
    for i, at in woke.items():
        assert deadlines[i] - 1e-9 <= at <= deadlines[i] + 0.05 + 1e-9
    # an earlier deadline arriving while the timer waits for a later one re-arms it
    async with trio.open_nursery() as n:
        timer = PollTimer(n)
        late: list[float] = []

        async def one(after: float, delay: float) -> None:
            await trio.sleep(delay)
            t0 = trio.current_time()
            await timer.sleep_until(t0 + after)
            late.append(trio.current_time() - t0 - after)

        n.start_soon(one, 10.0, 0)
        n.start_soon(one, 1.0, 0.5)
    assert [abs(x) < 1e-9 for x in late] == [True, True]


async def test_cancelled_sleeper_and_restart(autojump_clock: trio.testing.MockClock) -> None:
    out: list[str] = []
    async with trio.open_nursery() as n:
        timer = PollTimer(n, slack=0.01)

        async def sleeper(name: str, after: float, scope: trio.CancelScope) -> None:
            with scope:
                await timer.sleep_until(trio.current_time() + after)
                out.append(name)
                return
            out.append(f"{name} cancelled at {trio.current_time():.1f}")

        stop = trio.CancelScope()
        n.start_soon(sleeper, "a", 5.0, stop)
        n.start_soon(sleeper, "b", 2.0, trio.CancelScope())
        await trio.sleep(1.0)
        stop.cancel()
        await trio.sleep(5.0)
        assert out == ["a cancelled at 1.0", "b"]
        assert len(n.child_tasks) == 0  # the timer's task ended with its last sleeper
        n.start_soon(sleeper, "c", 3.0, trio.CancelScope())  # and starts again for a new one
    assert out[-1] == "c"


async def test_sleepers_outlive_a_cancelled_timer(autojump_clock: trio.testing.MockClock) -> None:
    """The timer's task runs in its own nursery: when that is cancelled, sleepers parked from
    other tasks are woken (early) instead of being left parked for ever."""
    woke: list[float] = []

    async def sleeper(timer: PollTimer) -> None:
        await timer.sleep_until(trio.current_time() + 100.0)
        woke.append(trio.current_time())

    with trio.fail_after(1000):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as timer_nursery:
                timer = PollTimer(timer_nursery)
                outer.start_soon(sleeper, timer)
                outer.start_soon(sleeper, timer)
                await trio.sleep(1.0)
                timer_nursery.cancel_scope.cancel()
    assert woke == [1.0, 1.0]  # at the cancellation, not at the deadline (101.0)



async def test_request_slots_bound_hand_over_and_cancel() -> None:
    """The monitors' request bound (monitor.RequestSlots): at most n holders; a release hands its
    slot to the first waiter; a waiter cancelled before that takes none."""
    from keytrio.actors.verifier.monitor import RequestSlots

    slots = RequestSlots(2)
    holding: list[str] = []
    release = {n: trio.Event() for n in ("a", "b", "c", "d")}

    async def hold(name: str) -> None:
        await slots.acquire()
        holding.append(name)
        await release[name].wait()
        holding.remove(name)
        slots.release()

    async with trio.open_nursery() as nursery:
        for n in "abc":
            nursery.start_soon(hold, n)
            await trio.testing.wait_all_tasks_blocked()
        assert holding == ["a", "b"]  # c waits
        nursery.start_soon(hold, "d")  # waits behind c ...
        await trio.testing.wait_all_tasks_blocked()
        waiter = trio.CancelScope()

        async def cancelled_waiter() -> None:
            with waiter:
                await slots.acquire()
                holding.append("cancelled")

        nursery.start_soon(cancelled_waiter)
        await trio.testing.wait_all_tasks_blocked()
        waiter.cancel()  # ... and one more, cancelled while waiting
        await trio.testing.wait_all_tasks_blocked()
        release["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert holding == ["b", "c"]  # a's slot went to c, the first waiter
        release["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert holding == ["c", "d"]  # b's slot went to the next waiter, not the cancelled one
        release["c"].set()
        release["d"].set()
    assert holding == [] and slots._free == 2
