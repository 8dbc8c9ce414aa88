"""Agent registration + activation against the real registrar actor (both on real sockets)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.agent.registration import RegistrationError
from tests.actors.agent_support import registrar_for_agents, registrar_record, start_agent

pytestmark = pytest.mark.swtpm

AGENT_ID = "d432fbb3-d2f1-4a97-9ef7-75bd81c0a9e1"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


async def test_register_activate_restart_and_other_tpm(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, swtpm_factory: Any
) -> None:
    registrar = registrar_for_agents(pki, tmp_path)
    addrs = await nursery.start(registrar.run)
    opts = {"registrar_ip": "127.0.0.1", "registrar_port": addrs.http[1], "uuid": AGENT_ID,
            "retry_interval": 0.1, "max_retries": 3}

    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, **opts)
    info = r.info
    rec = await registrar_record(pki, addrs.https, AGENT_ID)
    assert rec["ek_tpm"] == _b64(info.ek_public)
    assert rec["aik_tpm"] == _b64(info.ak_public)
    assert info.ek_cert_der is not None and rec["ekcert"] is not None
    assert rec["mtls_cert"] == info.mtls_cert
    assert (rec["ip"], rec["port"], rec["regcount"]) == ("127.0.0.1", info.address[1], 1)
    await r.stop()

    # restarted: same identity, re-registered (regcount + 1), new port recorded
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, **opts)
    rec = await registrar_record(pki, addrs.https, AGENT_ID)
    assert (rec["aik_tpm"], rec["mtls_cert"], rec["regcount"]) == (_b64(info.ak_public), info.mtls_cert, 2)
    assert rec["port"] == r.info.address[1]
    await r.stop()

    # the same uuid on another TPM (different EK): the registrar refuses, the agent does not start
    other = await swtpm_factory(fresh=True)
    with pytest.raises(RegistrationError, match="403"):
        await start_agent(nursery, tmp_path / "other", pki, other.tcti, **opts,
                          data_dir=str(tmp_path / "other-data"))
    assert (await registrar_record(pki, addrs.https, AGENT_ID))["regcount"] == 2


async def test_registration_waits_for_an_unreachable_registrar(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    # until the registrar runs, its port hangs up on every connection (counted)
    attempts: list[float] = []
    arrived = trio.Event()

    async def hang_up(stream: trio.SocketStream) -> None:
        attempts.append(trio.current_time())
        arrived.set()
        await stream.aclose()

    door, door_closed = trio.CancelScope(), trio.Event()

    async def closed_registrar(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with door:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                async with trio.open_nursery() as inner:  # serve_listeners closes them when cancelled
                    await inner.start(trio.serve_listeners, hang_up, listeners)
                    task_status.started(listeners[0].socket.getsockname()[1])
        finally:
            door_closed.set()

    port = await nursery.start(closed_registrar)
    opts = {"registrar_ip": "127.0.0.1", "registrar_port": port, "uuid": AGENT_ID,
            "retry_interval": 0.2, "max_retries": 50}
    started: list[Any] = []

    async def agent_task() -> None:
        started.append(await start_agent(nursery, tmp_path, pki, swtpm.tcti, **opts))

    nursery.start_soon(agent_task)
    with trio.fail_after(30):  # a hang guard only
        while len(attempts) < 3:
            arrived = trio.Event()
            await arrived.wait()
    assert not started  # three attempts refused: still retrying, not given up
    door.cancel()
    await door_closed.wait()  # the port is free for the registrar
    registrar = registrar_for_agents(pki, tmp_path, port=port)
    addrs = await nursery.start(registrar.run)
    with trio.fail_after(10):
        while not started:
            await trio.sleep(0.05)
    assert (await registrar_record(pki, addrs.https, AGENT_ID))["regcount"] == 1
    await started[0].stop()
