"""The testbed's NAT gateway: outbound passes, inbound is refused (real sockets on loopback), and a
machine behind it registers through it while nobody can dial it (real swtpm, registrar, agent)."""

from pathlib import Path

import httpx
import pytest
import trio

from keytrio.testbed.nat import Nat
from keytrio.testbed.world import Testbed


async def _echo_server(task_status=trio.TASK_STATUS_IGNORED):
    async def echo(stream):
        async with stream:
            while data := await stream.receive_some(1024):
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(("127.0.0.1", listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(echo, listeners)


async def _roundtrip(address: tuple[str, int]) -> bytes | None:
    """The echo of b"ping", or None when the connection is refused or reset."""
    with trio.fail_after(5):
        try:
            async with await trio.open_tcp_stream(*address) as s:
                await s.send_all(b"ping")
                return await s.receive_some(1024) or None
        except (trio.BrokenResourceError, OSError):
            return None


async def test_outbound_passes_inbound_is_refused():
    async with trio.open_nursery() as n:
        outside = await n.start(_echo_server)
        nat = await n.start(Nat().run)
        via = await nat.route(outside)
        assert via != outside and await nat.route(outside) == via  # one route per destination
        assert await _roundtrip(via) == b"ping"
        assert await _roundtrip(via) == b"ping"
        assert nat.outbound_connections == 2

        assert await _roundtrip(nat.public_address) is None  # nothing connects in
        assert nat.inbound_refused == 1
        n.cancel_scope.cancel()


async def test_uplink_cut_and_restored():
    async with trio.open_nursery() as n:
        outside = await n.start(_echo_server)
        nat = await n.start(Nat().run)
        via = await nat.route(outside)
        async with await trio.open_tcp_stream(*via) as live:
            await live.send_all(b"a")
            assert await live.receive_some(10) == b"a"
            nat.set_mode("refuse")  # the live connection is cut, new ones are refused
            with trio.fail_after(5):
                try:
                    data = await live.receive_some(10)
                except (trio.BrokenResourceError, OSError):
                    data = b""
            assert data == b""
        assert await _roundtrip(via) is None
        # a route opened while the uplink is down is down too
        other = await n.start(_echo_server)
        assert await _roundtrip(await nat.route(other)) is None

        nat.set_mode("blackhole")
        with trio.move_on_after(0.3) as scope:
            async with await trio.open_tcp_stream(*via) as s:
                await s.send_all(b"ping")
                await s.receive_some(10)
        assert scope.cancelled_caught  # connects, but nothing ever answers

        nat.set_mode("pass")
        assert await _roundtrip(via) == b"ping"
        assert await _roundtrip(await nat.route(other)) == b"ping"
        assert await _roundtrip(nat.public_address) is None  # restoring the uplink opens nothing inbound
        n.cancel_scope.cancel()


async def test_nat_must_run_first():
    nat = Nat()
    with pytest.raises(RuntimeError):
        await nat.route(("127.0.0.1", 1))
    with pytest.raises(RuntimeError):
        nat.public_address  # noqa: B018


@pytest.mark.swtpm
async def test_machine_behind_nat_registers_out_and_cannot_be_dialled(tmp_path: Path):
    async with Testbed(tmp_path, machines=1, seed=3) as tb:
        direct = tb.machines[0]
        (m,) = await tb.add_machines(1, behind_nat=True)
        assert m.nat is not None and m.proxy is None and direct.nat is None

        # outbound: the agent registered and activated through the gateway (one kept-alive
        # connection), and the registrar knows the machine only by the gateway's public address
        assert m.nat.outbound_connections >= 1
        assert (await tb.registrar.service.get(m.agent_id))["regcount"] == 1
        record = await tb.registrar.service.get(m.agent_id)
        assert (record["ip"], record["port"]) == m.contact == m.nat.public_address
        assert m.contact[1] != m.address[1]

        # inbound: the agent's contact address refuses TCP, TLS and HTTP alike
        assert await _roundtrip(m.contact) is None
        async with httpx.AsyncClient(verify=False, timeout=5) as client:
            with pytest.raises(httpx.TransportError):
                await client.get("https://{}:{}/version".format(*m.contact))
        assert m.nat.inbound_refused == 2

        # outbound keeps working afterwards: an agent restart registers again through the NAT
        before = m.nat.outbound_connections
        await m.stop_agent()
        await m.start_agent()
        assert m.nat.outbound_connections > before
        assert (await tb.registrar.service.get(m.agent_id))["regcount"] == 2

        # machine.outbound routes any destination through the gateway (a push agent's verifier)
        via = await m.outbound(tb.verifier_address)
        assert via != tb.verifier_address and await direct.outbound(tb.verifier_address) == tb.verifier_address
        async with httpx.AsyncClient(verify=False, timeout=5) as client:
            r = await client.get("https://{}:{}/version".format(*via))
        assert r.status_code == 200

        # cutting the machine's network cuts its uplink; a direct machine is not affected
        m.cut_network()
        assert await _roundtrip(via) is None
        m.restore_network()
        async with httpx.AsyncClient(verify=False, timeout=5) as client:
            assert (await client.get("https://{}:{}/version".format(*via))).status_code == 200


@pytest.mark.swtpm
async def test_push_machine_behind_nat_attests_through_it(tmp_path: Path):
    async with Testbed(tmp_path, machines=0, seed=4, quote_interval=0.3,
                       verifier_options={"mode": "both"}) as tb:
        (m,) = await tb.add_machines(1, behind_nat=True, mode="push")
        assert m.agent is not None and m.agent.app is None  # a push agent binds no port
        record = await tb.registrar.service.get(m.agent_id)
        assert (record["ip"], record["port"]) == (None, None)  # registered through the NAT, no contact

        await tb.enrol_push(m)
        with trio.fail_after(60):
            while not any(a["evaluation"] == "pass" for a in await tb.push_attestations(m)):
                await trio.sleep(0.1)
        # its sessions, capabilities and evidence all went out through the gateway; nothing came in
        assert m.nat.outbound_connections >= 2 and m.nat.inbound_refused == 0
        assert await _roundtrip(m.contact) is None

        # uplink cut: the agent cannot reach the verifier; restored: it resumes by itself
        m.cut_network()
        cut_at = m.nat.outbound_connections
        with trio.fail_after(30):
            while m.nat.outbound_connections < cut_at + 2:  # refused attempts, retried with backoff
                await trio.sleep(0.1)
        last = max(a["index"] for a in await tb.push_attestations(m))  # the history is bounded: compare indexes
        m.restore_network()
        with trio.fail_after(60):
            while not any(a["index"] > last and a["evaluation"] == "pass" for a in await tb.push_attestations(m)):
                await trio.sleep(0.1)
