"""A TCP proxy in front of an agent, to cut a machine's network without touching the agent.

Modes: ``pass`` (forward both ways), ``refuse`` (new connections are reset at once; existing
ones are cut), ``blackhole`` (connections are accepted but nothing is forwarded or answered:
clients see timeouts). Peers are told the proxy's port as the agent's contact port.
"""

from __future__ import annotations

import socket
from typing import Literal

import trio

Mode = Literal["pass", "refuse", "blackhole"]


class NetProxy:
    def __init__(self, target: tuple[str, int] | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.mode: Mode = "pass"
        self.connections = 0  # accepted connections, for tests and reports
        self._live: set[trio.CancelScope] = set()  # one per forwarded connection, cancelled to cut it
        self._nursery: trio.Nursery | None = None

    def set_mode(self, mode: Mode) -> None:
        if mode not in ("pass", "refuse", "blackhole"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        self.mode = mode
        if mode != "pass":
            for scope in self._live:
                scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.mode == "refuse" or self.target is None:
                _reset(client)
                return
            if self.mode == "blackhole":
                # cut too by a later set_mode("refuse"/"blackhole"): clients then see a reset
                hole = trio.CancelScope()
                self._live.add(hole)
                try:
                    with hole:
                        await _swallow(client)
                    if hole.cancelled_caught:
                        _reset(client)
                finally:
                    self._live.discard(hole)
                return
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                _reset(client)
                return
            # A CancelScope can be entered only once: each connection gets its own.
            scope = trio.CancelScope()
            self._live.add(scope)
            try:
                async with upstream:
                    with scope:
                        async with trio.open_nursery() as n:
                            n.start_soon(_pump, client, upstream, n.cancel_scope)
                            n.start_soon(_pump, upstream, client, n.cancel_scope)
                    if scope.cancelled_caught:
                        _reset(client)
            finally:
                self._live.discard(scope)


def _reset(stream: trio.SocketStream) -> None:
    # SO_LINGER 0 makes close() send RST: the client sees "connection refused/reset" at once.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


async def _swallow(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        scope.cancel()
