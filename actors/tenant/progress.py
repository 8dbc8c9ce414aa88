"""Progress while the tenant waits: a spinner on a terminal, plain lines otherwise (logs, pipes)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

import trio

_FRAMES = "|/-\\"


class Progress:
    """``async with progress.step("waiting for Get Quote"):`` shows the step until it ends.

    On a TTY a spinner redraws one line of ``stream`` (stderr; cleared afterwards, so the final
    result or error line stands alone); elsewhere each step is one plain line on ``lines`` (stdout
    by default there, so that a failure stays exactly one line on stderr), written when it starts.
    """

    def __init__(self, stream: TextIO, *, lines: TextIO | None = None, tty: bool | None = None,
                 quiet: bool = False, interval: float = 0.1) -> None:
        self.stream = stream
        self.lines = lines or stream
        if tty is None:
            isatty = getattr(stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.quiet = quiet
        self.interval = interval

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.lines, flush=True)

    @asynccontextmanager
    async def step(self, text: str) -> AsyncIterator[None]:
        if self.quiet:
            yield
            return
        if not self.tty:
            self.line(f"{text} ...")
            yield
            return
        # The body's error is re-raised outside the nursery: raised through it, it would arrive
        # wrapped in an ExceptionGroup and the caller's ``except TenantError`` would miss it.
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._spin, text)
            try:
                yield
            except Exception as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        self.stream.write("\r\x1b[K")  # after the spinner task ended: nothing redraws it
        self.stream.flush()
        if error is not None:
            raise error

    async def _spin(self, text: str) -> None:
        start = trio.current_time()
        for frame in itertools.cycle(_FRAMES):
            self.stream.write(f"\r{frame} {text} ({trio.current_time() - start:.0f} s)\x1b[K")
            self.stream.flush()
            await trio.sleep(self.interval)
