"""The testbed's TCP proxy: pass, refuse, blackhole, restore (real sockets on loopback)."""

import trio

from keytrio.testbed.netproxy import NetProxy


async def _echo_server(task_status=trio.TASK_STATUS_IGNORED):
    async def echo(stream):
        async with stream:
            while data := await stream.receive_some(1024):
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def _roundtrip(port: int) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(b"ping")
        return await s.receive_some(1024)


async def test_pass_refuse_blackhole_restore():
    async with trio.open_nursery() as n:
        echo_port = await n.start(_echo_server)
        proxy = NetProxy(("127.0.0.1", echo_port))
        port = await n.start(proxy.run)
        assert await _roundtrip(port) == b"ping"

        proxy.set_mode("refuse")
        with trio.fail_after(5):
            try:
                got = await _roundtrip(port)
            except (trio.BrokenResourceError, OSError):
                got = None
        assert not got

        proxy.set_mode("blackhole")
        with trio.move_on_after(0.3) as scope:
            await _roundtrip(port)
        assert scope.cancelled_caught  # no answer ever comes

        proxy.set_mode("pass")
        assert await _roundtrip(port) == b"ping"
        assert proxy.connections == 4
        n.cancel_scope.cancel()


async def test_refuse_cuts_live_connections():
    async with trio.open_nursery() as n:
        echo_port = await n.start(_echo_server)
        proxy = NetProxy(("127.0.0.1", echo_port))
        port = await n.start(proxy.run)
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            await s.send_all(b"a")
            assert await s.receive_some(10) == b"a"
            proxy.set_mode("refuse")
            with trio.fail_after(5):
                try:
                    data = await s.receive_some(10)
                except (trio.BrokenResourceError, OSError):
                    data = b""
            assert data == b""
        n.cancel_scope.cancel()
