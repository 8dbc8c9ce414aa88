"""One task for many deadlines: the shared core of the poll timer and the request watchdog.

Per-task cancel scopes with deadlines cost a scope, a registration and (when they fire) an
exception unwound through the task, once per poll per agent. Instead, entries
``[deadline, seq, item]`` go on a heap and one task sleeps until the earliest deadline plus
``slack`` (deadlines close together share one wake-up; nothing is handed over early), then
hands every item whose deadline passed to :meth:`DeadlineHeap._due`. Whoever no longer wants
its entry sets ``entry[2] = None``; the entry is dropped when it comes due. The task runs only
while entries are pending, so an idle heap keeps no task alive.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import trio


class DeadlineHeap:
    """Subclasses say how the task is started (:meth:`_spawn`) and what a due item gets."""

    def __init__(self, slack: float) -> None:
        self._slack = max(0.0, slack)
        self._heap: list[list[Any]] = []  # [deadline, seq, item or None (withdrawn)]
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None  # the task's wait, while it runs

    def _push(self, deadline: float, item: Any) -> list[Any]:
        entry = [deadline, next(self._seq), item]
        heapq.heappush(self._heap, entry)
        if self._scope is None:
            self._scope = trio.CancelScope(deadline=deadline + self._slack)
            self._spawn(self._run, self._scope)
        elif deadline + self._slack < self._scope.deadline:
            self._scope.deadline = deadline + self._slack  # an earlier one: re-arm
        return entry

    def _spawn(self, fn: Any, scope: trio.CancelScope) -> None:
        raise NotImplementedError

    def _due(self, item: Any) -> None:
        raise NotImplementedError

    def _closing(self, heap: list[list[Any]]) -> None:
        """The task ends (its heap is empty, or it was cancelled with entries left)."""

    async def _run(self, scope: trio.CancelScope) -> None:
        heap = self._heap
        try:
            while heap:
                with scope:
                    await trio.sleep_forever()
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    item = heapq.heappop(heap)[2]
                    if item is not None:
                        self._due(item)
                if heap:
                    # every entry left is due after `now`: its deadline, never earlier
                    scope = trio.CancelScope(deadline=heap[0][0] + self._slack)
                    self._scope = scope
        finally:
            self._scope = None
            self._closing(heap)
