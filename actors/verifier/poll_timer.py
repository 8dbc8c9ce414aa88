"""One timer for all of a verifier's monitors (the sleep between two polls of an agent).

``trio.sleep`` gives every sleeping task its own cancel scope with a deadline, and trio wakes it
by cancelling that scope: an exception raised into the task and unwound through it, once per
poll per agent. Here the monitors park on a heap of deadlines and one task wakes them with
``trio.lowlevel.reschedule`` (no scope, no exception), every sleeper whose deadline passed in
one go. That task runs only while someone sleeps (started on demand in the given nursery, it
ends when the heap is empty), so a nursery whose monitors all ended can close.

``slack``: a sleeper wakes at its deadline or up to ``slack`` seconds later, so that deadlines
close together share one wake-up of the timer task (never earlier than its deadline).
A sleeper cancelled meanwhile (a tenant stop, shutdown) gets Cancelled at once, as with
``trio.sleep``; its heap entry is dropped when it comes due.
"""

from __future__ import annotations

from typing import Any

import trio

from keytrio.actors.common.deadline_heap import DeadlineHeap


class PollTimer(DeadlineHeap):
    def __init__(self, nursery: trio.Nursery, *, slack: float = 0.0) -> None:
        super().__init__(slack)
        self._nursery = nursery

    async def sleep_until(self, deadline: float) -> None:
        """Like ``trio.sleep_until(deadline)`` (a checkpoint; Cancelled when cancelled)."""
        entry = self._push(deadline, trio.lowlevel.current_task())

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            entry[2] = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _spawn(self, fn: Any, scope: trio.CancelScope) -> None:
        self._nursery.start_soon(fn, scope)

    def _due(self, task: Any) -> None:
        trio.lowlevel.reschedule(task)

    def _closing(self, heap: list[list[Any]]) -> None:
        # whoever still sleeps (only if the timer task was cancelled: the nursery is closing and
        # cancels them too) is woken so that nothing is left parked
        for entry in heap:
            if entry[2] is not None:
                trio.lowlevel.reschedule(entry[2])
                entry[2] = None
        heap.clear()
