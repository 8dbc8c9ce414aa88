"""Our push agent (real swtpm machine, real IMA log extending PCR 10) against OUR verifier in push
mode (actors/verifier/push/), enrolled the way upstream's tenant enrols a push agent, on trio's
MockClock: the attestations pass at the verifier's interval, a file outside the runtime policy
fails the next one. The two halves of issue 19 were written apart; this is where they meet."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.testbed.machine import Machine
from keytrio.testbed.pki import CaFiles
from tests.actors.agent_support import registrar_for_agents
from tests.actors.verifier.push_support import push_enrol_body
from tests.actors.verifier_support import start_verifier

pytestmark = pytest.mark.swtpm

AGENT_ID = "0c0c0c0c-0000-4000-8000-00000000000c"
GUARD = 600  # mock seconds: a hang guard only


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=1.0)  # see test_push_loop.py


def policy_from(ima_log: Path) -> dict[str, Any]:
    """A runtime policy (upstream's JSON format) allowing every file the log holds now."""
    digests: dict[str, list[str]] = {}
    for line in ima_log.read_text().splitlines():
        _pcr, _th, _tmpl, digest, path = line.split(" ", 4)
        if path != "boot_aggregate":
            digests.setdefault(path, []).append(digest.split(":", 1)[1])
    return {"meta": {"version": 1, "generator": 3}, "release": 0, "digests": digests, "excludes": [],
            "keyrings": {}, "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
            "ima-buf": {}, "verification-keys": ""}


async def latest(rv: Any, base: str) -> dict[str, Any]:
    resp = await rv.admin.get(f"{base}/v3/agents/{AGENT_ID}/attestations/latest")
    return resp.json()["data"] if resp.status_code == 200 else {}


async def wait_latest(rv: Any, base: str, pred: Any) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        while not pred(got := await latest(rv, base)):
            await trio.sleep(0.5)
    return got


async def test_our_push_agent_with_our_push_verifier(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    ca_dir = tmp_path / "cv_ca"
    ca_dir.mkdir()
    shutil.copy(pki.ca, CaFiles(ca_dir).ca)
    registrar = await nursery.start(registrar_for_agents(pki, tmp_path).run)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", clock=clock.current_time, mode="push",
                              quote_interval=5.0)
    host, port = rv.verifier.address  # type: ignore[misc]
    base = f"https://{host}:{port}"
    machine = Machine("m-push", tmp_path, CaFiles(ca_dir), registrar=registrar.http, uuid=AGENT_ID, mode="push",
                      verifier_url=base, verifier_tls_ca_cert=str(pki.ca),
                      backoff_initial_delay=1.0, backoff_max_delay=4.0)
    await nursery.start(machine.run)
    for i in range(3):
        await machine.measure(f"/usr/bin/good{i}", b"good %d" % i)
    assert machine.agent is not None and machine.agent.push is not None and machine.info is not None
    push = machine.agent.push
    await push.wait_for(lambda s: s.failures >= 1)  # not enrolled yet: sessions refused

    body = push_enrol_body("rsa", policy_from(machine.ima_path),
                           ak_tpm=base64.b64encode(machine.info.ak_public).decode())
    await rv.call("POST", f"/agents/{AGENT_ID}", body)
    first = await wait_latest(rv, base, lambda d: d.get("attributes", {}).get("stage") == "verification_complete")
    assert first["attributes"]["evaluation"] == "pass", json.dumps(first)[:2000]
    later = await wait_latest(rv, base, lambda d: int(d.get("id", -1)) >= int(first["id"]) + 2
                              and d["attributes"]["stage"] == "verification_complete")
    assert later["attributes"]["evaluation"] == "pass", json.dumps(later)[:2000]
    assert push.stats.sessions == 1, push.stats

    await machine.measure("/usr/bin/not-in-policy", b"evil")
    failed = await wait_latest(rv, base, lambda d: d.get("attributes", {}).get("evaluation") == "fail")
    assert int(failed["id"]) > int(later["id"]), failed
    assert failed["attributes"].get("failure_reason") == "policy_violation", json.dumps(failed)[:2000]
    nursery.cancel_scope.cancel()
