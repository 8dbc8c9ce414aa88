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
