"""The whole agent in push mode (``mode = "push"``) on a real swtpm: it registers with our real
registrar without a contact (no ip, port or mTLS cert), waits while the verifier does not know it
yet, attests once enrolled, and never listens on a port. Its config refuses push mode without the
verifier's URL and CA; ``deploy/agent-push.toml`` loads."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.agent import config as agent_config
from keytrio.actors.agent.actor import Agent
from keytrio.actors.common.config import ConfigError
from keytrio.actors.common.startup import Exit, StartupError
from tests.actors.agent.push_verifier import PushVerifier
from tests.actors.agent_support import registrar_for_agents, registrar_record

AGENT_ID = "d432fbb3-d2f1-4a97-9ef7-75bd81c0a9e2"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=1.0)  # see test_push_loop.py


def listening_inodes() -> set[str]:
    """Socket inodes of this process that are listening TCP sockets (IPv4 and IPv6)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            ours.add(m.group(1))
    listening = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening.add(fields[9])
    return ours & listening


def push_options(tmp: Path, swtpm: Any, verifier: PushVerifier, pki: Any, registrar_port: int) -> dict[str, Any]:
    boot = tmp / "boottime"
    boot.write_text("1767225600\n")
    ima = tmp / "ima"
    ima.write_text("10 " + "00" * 20 + " ima-ng sha256:" + "11" * 32 + " boot_aggregate\n")
    return {"mode": "push", "tcti": swtpm.tcti, "uuid": AGENT_ID, "data_dir": str(tmp / "agent"),
            "registrar_ip": "127.0.0.1", "registrar_port": registrar_port, "retry_interval": 0.5,
            "verifier_url": verifier.url, "verifier_tls_ca_cert": str(pki.ca), "tpm_hash_alg": "sha256",
            "boottime_source": str(boot), "ima_ml_path": str(ima), "measuredboot_ml_path": str(tmp / "none"),
            "backoff_initial_delay": 1.0, "backoff_max_delay": 4.0, "secure_mount": "never"}


async def test_push_agent_registers_without_contact_attests_and_binds_nothing(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, clock: MockClock
) -> None:
    registrar = registrar_for_agents(pki, tmp_path)
    addrs = await nursery.start(registrar.run)
    verifier = PushVerifier(pki.server.cert, pki.server.key, AGENT_ID, ak_public=None)
    await verifier.start(nursery)
    before = listening_inodes()
    assert len(before) >= 3  # the detector sees the registrar's two and the verifier's listeners

    agent = Agent.from_options(**push_options(tmp_path, swtpm, verifier, pki, addrs.http[1]))
    address = await nursery.start(agent.run)
    assert address == ("", 0) and agent.info is not None and agent.push is not None
    assert agent.app is None and agent.metrics_address is None
    rec = await registrar_record(pki, addrs.https, AGENT_ID)
    assert rec["aik_tpm"] and (rec["ip"], rec["port"], rec["mtls_cert"]) == (None, None, None), rec

    # not enrolled: sessions answer evaluation fail, the agent backs off 1, 2, 4, 4 s
    await agent.push.wait_for(lambda s: s.failures >= 4)
    proofs = [s.at for s in verifier.seen if s.method == "PATCH"]
    assert [round(b - a, 6) for a, b in itertools.pairwise(proofs)] == [1.0, 2.0, 4.0], proofs
    assert listening_inodes() == before  # the agent listens on nothing

    # enrolled (the AK the registrar holds): the next session passes and evidence flows
    verifier.ak_public, verifier.enrolled = agent.info.ak_public, True
    await agent.push.wait_for(lambda s: s.accepted >= 2)
    assert verifier.problems == [] and listening_inodes() == before
    assert verifier.attestations[0]["lines"].endswith("boot_aggregate\n")


def test_push_config_needs_the_verifier_and_the_sample_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        agent_config.load(None, env={}, overrides={"mode": "push"})
    text = str(err.value)
    assert "verifier_url: required" in text and "verifier_tls_ca_cert: required" in text
    assert "registrar_ip: required" in text
    with pytest.raises(ConfigError, match="verifier_url: must be an https:// URL"):
        agent_config.load(None, env={}, overrides={"verifier_url": "http://v:8881"})
    sample = agent_config.load(REPO / "deploy" / "agent-push.toml", env={})
    assert sample.mode == "push" and sample.verifier_url.startswith("https://")
    assert agent_config.load(None, env={"KEYTRIO_AGENT_MODE": "push", "KEYTRIO_AGENT_VERIFIER_URL": "https://v:1",
                                        "KEYTRIO_AGENT_VERIFIER_TLS_CA_CERT": "/x", "KEYTRIO_AGENT_REGISTRAR_IP": "r"
                                        }).mode == "push"


async def test_push_agent_without_the_verifier_ca_file_is_a_tls_failure(tmp_path: Path, swtpm: Any) -> None:
    agent = Agent.from_options(mode="push", tcti=swtpm.tcti, data_dir=str(tmp_path / "a"), registrar_ip="127.0.0.1",
                               verifier_url="https://127.0.0.1:1", verifier_tls_ca_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(StartupError) as err:
        await agent.run()
    assert err.value.code == Exit.TLS, err.value
