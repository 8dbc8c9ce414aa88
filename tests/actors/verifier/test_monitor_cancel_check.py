"""monitor._cancelled (the monitor's "stopped while this step ran?" before it hands a record over)
against what it replaces, ``trio.current_effective_deadline() == -math.inf``, in every way a
monitor's task can be cancelled or not: its own scope (a tenant stop), an enclosing one
(shutdown), a shield, a deadline that passed but was not processed yet, and after a cancelled
scope was left."""

from __future__ import annotations

import math

import trio

from keytrio.actors.verifier import monitor


def _both() -> tuple[bool, bool]:
    return monitor._cancelled(), trio.current_effective_deadline() == -math.inf


async def test_cancel_check_agrees_with_the_effective_deadline() -> None:
    seen: list[tuple[str, tuple[bool, bool]]] = []

    def look(name: str) -> None:
        seen.append((name, _both()))

    look("plain")
    with trio.CancelScope() as own:
        look("own, not cancelled")
        own.cancel()
        look("own cancelled")
        with trio.CancelScope(shield=True):
            look("shielded inside a cancelled scope")
            with trio.CancelScope() as inner:
                inner.cancel()
                look("cancelled inside the shield")
        look("own cancelled, after the shield")
    look("after leaving the cancelled scope")

    async def child(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        look("child, not cancelled")
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            look("child, its nursery cancelled")

    async with trio.open_nursery() as n:
        with trio.CancelScope(deadline=trio.current_time() + 10) as timed:
            await n.start(child)
            look("nested, not cancelled")
            timed.deadline = trio.current_time() - 1  # passed, not processed until the next pass
            look("deadline passed, not processed")
            await trio.lowlevel.checkpoint_if_cancelled()
        look("after the deadline's scope")
        n.cancel_scope.cancel()
        look("the nursery cancelled (as at shutdown)")
    look("after the nursery")

    for name, (fast, walk) in seen:
        assert fast is walk, (name, fast, walk)
    answers = dict(seen)
    assert answers["own cancelled"] == (True, True)
    assert answers["child, its nursery cancelled"] == (True, True)
    assert answers["the nursery cancelled (as at shutdown)"] == (True, True)
    assert answers["shielded inside a cancelled scope"] == (False, False)
    assert answers["deadline passed, not processed"] == (False, False)
    assert answers["plain"] == answers["after leaving the cancelled scope"] == (False, False)
    # the trio in use has the attribute (else the check takes the walk: still right, only dearer)
    assert isinstance(trio.lowlevel.current_task()._cancel_status.effectively_cancelled, bool)
