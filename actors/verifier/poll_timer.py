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

import heapq
import itertools
from typing import Any

import trio


class PollTimer:
    def __init__(self, nursery: trio.Nursery, *, slack: float = 0.0) -> None:
        self._nursery = nursery
        self._slack = max(0.0, slack)
        self._heap: list[list[Any]] = []  # [deadline, seq, task or None (cancelled)]
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None  # the timer task's wait, while it runs

    async def sleep_until(self, deadline: float) -> None:
        """Like ``trio.sleep_until(deadline)`` (a checkpoint; Cancelled when cancelled)."""
        entry = [deadline, next(self._seq), trio.lowlevel.current_task()]
        heapq.heappush(self._heap, entry)
        if self._scope is None:
            self._scope = trio.CancelScope(deadline=deadline + self._slack)
            self._nursery.start_soon(self._run, self._scope)
        elif deadline + self._slack < self._scope.deadline:
            self._scope.deadline = deadline + self._slack  # an earlier one: re-arm

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            entry[2] = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _run(self, scope: trio.CancelScope) -> None:
        heap = self._heap
        try:
            while heap:
                with scope:
                    await trio.sleep_forever()
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    task = heapq.heappop(heap)[2]
                    if task is not None:
                        trio.lowlevel.reschedule(task)
                if heap:
                    scope = trio.CancelScope(deadline=max(heap[0][0] + self._slack, now))
                    self._scope = scope
        finally:
            self._scope = None
            # whoever still sleeps (only if this task was cancelled: the nursery is closing and
            # cancels them too) is woken so that nothing is left parked
            for entry in heap:
                if entry[2] is not None:
                    trio.lowlevel.reschedule(entry[2])
                    entry[2] = None
            heap.clear()
