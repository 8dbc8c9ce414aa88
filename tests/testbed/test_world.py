"""The Testbed world: registrar + verifier + machines in one nursery, tenant steps, observed
states/events/notices, a verifier restart, and notices only when signed with the CA's key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.protocol import revocation
from keytrio.testbed.observe import GONE, Observer
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE, Testbed, WaitTimeout, machine_uuid

pytestmark = pytest.mark.swtpm


async def _post_notice(tb: Testbed, m, key: rsa.RSAPrivateKey) -> int:
    assert tb.ca is not None
    msg = revocation.build_message(agent_id=m.agent_id, ip="127.0.0.1", port=1, tpm_policy="{}", meta_data="{}",
                                   event_time=time.asctime(), event_id="test.forged", severity_label="critical",
                                   context={}, notice_id=f"forged-{id(key)}")
    ctx = tls.client_context([tb.ca.ca], tb.ca.client_cert, tb.ca.client_key, pinned_server_cert_pem=m.info.mtls_cert)
    async with make_client(ctx, timeout=5) as client:
        resp = await client.post("https://{}:{}/v2.1/notifications/revocation".format(*m.contact),
                                 json={"msg": msg, "signature": revocation.sign_message(key, msg)})
    return resp.status_code


async def test_testbed_enrol_fail_notify_restart(tmp_path: Path):
    observer = Observer()
    async with Testbed(tmp_path, machines=2, seed=5, observer=observer) as tb:
        a, b = tb.machines
        assert a.agent_id == machine_uuid(5, "m0") and b.agent_id == machine_uuid(5, "m1")
        assert tb.describe()["agents"][1]["agent_id"] == b.agent_id

        value = (await a.read_pcrs("sha256", [15]))[15].hex()
        res = await tb.enrol(a, tpm_policy={"15": [value]})
        assert res.verified and res.operational_state == GET_QUOTE
        await tb.enrol(b)
        await tb.wait_count(a, 2)

        # a wait that cannot succeed names what it saw
        with pytest.raises(WaitTimeout, match=r"m1: not in state Invalid Quote .*states seen: Get Quote"):
            await tb.wait_state(b, INVALID_QUOTE, timeout=0.3)

        # a notice signed by another key is refused by the agent and never reaches the actions
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        assert await _post_notice(tb, b, stranger) == 403
        # the same notice signed with the CA's RevocationNotifier key runs the actions
        assert tb.ca is not None
        ca_key = serialization.load_pem_private_key(tb.ca.revocation_key.read_bytes(), password=None)
        assert await _post_notice(tb, b, ca_key) == 200
        forged = await tb.wait_notices(b, 1)
        assert forged[0]["event_id"] == "test.forged"

        await a.extend_data(15, b"tamper")
        await tb.wait_state(a, INVALID_QUOTE)
        await tb.wait_notices(a, 1)
        await tb.wait_notices(b, 2)
        assert observer.events("m0") == ["pcr_validation.invalid_pcr_15"]
        assert observer.states("m0") == [GET_QUOTE, INVALID_QUOTE]
        assert sorted(observer.notices("m1")) == [("m0", "pcr_validation.invalid_pcr_15"), ("m1", "test.forged")]

        # restart: same port, b resumes
        address = tb.verifier_address
        count = (await tb.get(b))["attestation_count"]
        await tb.restart_verifier()
        assert tb.verifier_address == address
        await tb.wait_count(b, count + 2)

        await tb.tenant.delete(b.agent_id)
        await tb.wait_gone(b)
        assert observer.states("m1")[-1] == GONE
    # torn down: the agents' ports are closed
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*a.address)
