"""Runs payload scripts and revocation actions as subprocesses in the agent's nursery.

Scripts run in the background (an HTTP request that delivered the payload or the notice does not
wait for them, and a client that hangs up does not cancel them), one batch at a time in order,
each with a timeout; their output goes to the log. ``run_as`` ("user[:group]") applies to the
subprocesses only: ten agents can share one process, so the process never changes its own user.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("keytrio.agent")



@dataclass(frozen=True)
class Job:
    argv: list[str]
    cwd: Path
    stdin: bytes = b""
    label: str = ""


class Runner:
    def __init__(self, *, timeout: float, run_as: str | None, agent_id: str = "") -> None:
        self.timeout = timeout
        self.agent_id = agent_id
        self._user: str | None = None
        self._group: str | None = None
        if run_as:
            user, _, group = run_as.partition(":")
            self._user = user or None
            self._group = group or None
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()  # batches run one after the other, in submission order
        self.completed = 0  # jobs finished (any exit status): lets tests wait without sleeping
        self._changed = trio.Event()

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def submit(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs`` one after the other in the background."""
        if not jobs:
            return
        if self._nursery is None:
            raise RuntimeError("runner is not attached to a nursery")
        self._nursery.start_soon(self._batch, list(jobs))

    async def wait_completed(self, count: int) -> None:
        """Wait until ``count`` jobs have finished in total."""
        while self.completed < count:
            await self._changed.wait()

    async def _batch(self, jobs: list[Job]) -> None:
        async with self._lock:
            for job in jobs:
                await self.run(job)

    async def run(self, job: Job) -> int | None:
        """Run one job now; returns its exit status (None on timeout or failure to start)."""
        kwargs: dict[str, object] = {}
        if os.geteuid() == 0:
            if self._user:
                kwargs["user"] = self._user
            if self._group:
                kwargs["group"] = self._group
        rc: int | None = None
        try:
            with trio.move_on_after(self.timeout) as scope:
                proc = await trio.run_process(
                    job.argv,
                    cwd=os.fspath(job.cwd),
                    stdin=job.stdin,
                    capture_stdout=True,
                    stderr=subprocess.STDOUT,
                    check=False,
                    **kwargs,
                )
                rc = proc.returncode
                # only the size of the output: payload scripts may print what they were given
                log.info("agent=%s event=script_done job=%s rc=%s output_bytes=%d", self.agent_id, job.label, rc,
                         len(proc.stdout or b""))
            if scope.cancelled_caught:
                log.warning("agent=%s event=script_timeout job=%s after %.0fs", self.agent_id, job.label, self.timeout)
        except OSError as exc:
            log.warning("agent=%s event=script_failed job=%s error=%s", self.agent_id, job.label, exc)
        finally:
            self.completed += 1
            self._changed.set()
            self._changed = trio.Event()
        return rc
