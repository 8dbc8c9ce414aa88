"""A NAT gateway in front of a machine: its outbound connections pass, nothing connects in.

Like a home router or a cloud NAT without port forwarding. The machine's agent reaches the
registrar and the verifier only through the gateway's outbound routes (one forwarding port on the
gateway per destination, :meth:`Nat.route`), so the servers see the gateway's address as the
peer, and the testbed can cut the machine's uplink (:meth:`Nat.set_mode`). The gateway's public
address (:attr:`Nat.public_address`) is what peers learn as the machine's contact address; every
connection made to it is reset at once, as a NAT answers an unsolicited inbound SYN.

On loopback the isolation is by address, not by kernel: nothing tells a peer the agent's own
listening port (a pull agent still binds one; a push agent binds none), and every address the
testbed hands out for the machine is the gateway's.

    nat = Nat()
    await nursery.start(nat.run)
    registrar_via = await nat.route(registrar_http)   # give this to the agent as its registrar
    nat.public_address                                # refused: the machine cannot be dialled
"""

from __future__ import annotations

import trio

from keytrio.testbed.netproxy import Mode, NetProxy


class Nat:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._public = NetProxy(None, host=host)  # no target: every inbound connection is reset
        self._routes: dict[tuple[str, int], NetProxy] = {}
        self._nursery: trio.Nursery | None = None
        self.mode: Mode = "pass"

    @property
    def public_address(self) -> tuple[str, int]:
        """The machine's address as the outside sees it: dialling it is refused."""
        if self._nursery is None:
            raise RuntimeError("the NAT is not running")
        return (self.host, self._public.port)

    @property
    def inbound_refused(self) -> int:
        """Connections from outside that the gateway refused."""
        return self._public.connections

    @property
    def outbound_connections(self) -> int:
        """Connections the machine opened to the outside through the gateway (any mode)."""
        return sum(p.connections for p in self._routes.values())

    async def run(self, *, task_status: trio.TaskStatus[Nat] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._public.run)
            self._nursery = nursery
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def route(self, target: tuple[str, int]) -> tuple[str, int]:
        """The address on the machine's side through which it reaches ``target`` (same each time)."""
        if self._nursery is None:
            raise RuntimeError("the NAT is not running")
        target = (target[0], int(target[1]))
        proxy = self._routes.get(target)
        if proxy is None:
            proxy = NetProxy(target, host=self.host)
            await self._nursery.start(proxy.run)
            proxy.set_mode(self.mode)
            self._routes[target] = proxy
        return (self.host, proxy.port)

    def set_mode(self, mode: Mode) -> None:
        """Cut the uplink (``refuse``: reset at once, ``blackhole``: no answer) or restore it
        (``pass``); open connections are cut too. Inbound stays refused whatever the mode."""
        for proxy in self._routes.values():
            proxy.set_mode(mode)
        self.mode = mode
