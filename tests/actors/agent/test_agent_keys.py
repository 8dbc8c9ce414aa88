"""Agent U/V keys, payload (zip, autorun.sh) and revocation notices, over real mTLS + swtpm."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keytrio.protocol import payload as pl
from keytrio.protocol import revocation
from tests.actors.agent_support import Running, results, revocation_key_and_cert, start_agent

pytestmark = pytest.mark.swtpm


def _revocation_pair() -> tuple[rsa.RSAPrivateKey, str]:
    key, cert = revocation_key_and_cert()
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


REV_KEY, REV_CERT = _revocation_pair()
OTHER_KEY, _ = _revocation_pair()


def make_zip(files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((modes or {}).get(name, 0o644) | 0o100000) << 16
            zf.writestr(info, data)
    return buf.getvalue()


class Delivery:
    """One K split into U and V for an agent, with an optional payload under K."""

    def __init__(self, r: Running, payload: bytes | None = None, *, tag: str | None = None) -> None:
        self.halves = pl.new_key_halves(os.urandom(64))
        nk = r.info.nk_pem
        self.u_body: dict[str, Any] = {
            "encrypted_key": pl.encrypt_key_half(nk, self.halves.u),
            "auth_tag": tag or pl.auth_tag(self.halves.k, r.info.agent_id),
        }
        if payload is not None:
            self.u_body["payload"] = base64.b64encode(
                pl.encrypt_payload(self.halves.k, payload, os.urandom(16))).decode()
        self.v_body = {"encrypted_key": pl.encrypt_key_half(nk, self.halves.v)}


@pytest.fixture
async def running(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any):
    actions = tmp_path / "actions"
    actions.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    script = actions / "10-record.sh"
    script.write_text(f"#!/bin/sh\ncat > {out}/action-$$.json\necho action >> {out}/actions.log\n")
    script.chmod(0o755)
    (actions / "README").write_text("not executable: never run\n")
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, revocation_actions_dir=str(actions))
    r.out = out  # type: ignore[attr-defined]
    yield r
    await r.stop()


async def _verify(r: Running, k: bytes) -> None:
    res = results(await r.get("/keys/verify", challenge="chal1234"))
    assert res["hmac"] == pl.verify_hmac(k, "chal1234")


async def test_u_then_v_and_v_then_u_give_k(running: Running) -> None:
    r = running
    resp = await r.get("/keys/verify", challenge="chal1234")
    assert resp.status_code == 400  # no K yet

    d1 = Delivery(r)
    results(await r.post("/keys/ukey", d1.u_body))
    results(await r.post("/keys/vkey", d1.v_body))
    await _verify(r, d1.halves.k)

    d2 = Delivery(r)  # a re-enrolment, V first this time
    results(await r.post("/keys/vkey", d2.v_body))
    await _verify(r, d1.halves.k)  # K changes only once the pair matches
    results(await r.post("/keys/ukey", d2.u_body))
    await _verify(r, d2.halves.k)


async def test_payload_autorun_runs_once(running: Running) -> None:
    r = running
    marker = r.out / "autorun.log"  # type: ignore[attr-defined]
    payload = make_zip({"autorun.sh": f"echo ran >> {marker}\n", "data/config.txt": "hello"})
    d = Delivery(r, payload)
    results(await r.post("/keys/ukey", d.u_body))
    assert r.agent.runner is not None
    assert r.agent.runner.completed == 0  # nothing before V
    results(await r.post("/keys/vkey", d.v_body))
    with trio.fail_after(10):
        await r.agent.runner.wait_completed(1)
    assert marker.read_text() == "ran\n"
    secure = r.data_dir / "secure" / "unzipped"
    assert (secure / "data" / "config.txt").read_text() == "hello"
    assert oct((r.data_dir / "secure").stat().st_mode & 0o777) == oct(0o700)

    # the same halves delivered again (verifier retry, tenant re-post): no second run
    results(await r.post("/keys/vkey", d.v_body))
    results(await r.post("/keys/ukey", d.u_body))
    await trio.sleep(0.3)
    assert r.agent.runner.completed == 1
    assert marker.read_text() == "ran\n"
    await _verify(r, d.halves.k)


async def test_forged_tag_tampered_payload_and_wrong_key_run_nothing(running: Running, pki: Any) -> None:
    r = running
    marker = r.out / "autorun.log"  # type: ignore[attr-defined]
    payload = make_zip({"autorun.sh": f"echo ran >> {marker}\n"})

    # forged auth tag (V first): the U never pairs, nothing is decrypted or run
    d = Delivery(r, payload, tag="ab" * 48)
    results(await r.post("/keys/vkey", d.v_body))
    results(await r.post("/keys/ukey", d.u_body))
    assert (await r.get("/keys/verify", challenge="abc")).status_code == 400

    # right tag, tampered payload: 400 either order, nothing stored, nothing run
    for v_first in (True, False):
        d = Delivery(r, payload)
        blob = bytearray(base64.b64decode(d.u_body["payload"]))
        blob[20] ^= 1
        d.u_body["payload"] = base64.b64encode(bytes(blob)).decode()
        if v_first:
            results(await r.post("/keys/vkey", d.v_body))
            resp = await r.post("/keys/ukey", d.u_body)
        else:
            results(await r.post("/keys/ukey", d.u_body))
            resp = await r.post("/keys/vkey", d.v_body)
        assert resp.status_code == 400, resp.text
        assert "payload" in resp.json()["status"]
        assert (await r.get("/keys/verify", challenge="abc")).status_code == 400

    # a half encrypted to another key (not this agent's NK): 400
    other = Delivery(r)
    other.u_body["encrypted_key"] = pl.encrypt_key_half(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), other.halves.u)
    assert (await r.post("/keys/ukey", other.u_body)).status_code == 400

    # unsafe zip (path traversal): refused, nothing written outside
    evil = make_zip({"../escape.sh": "echo no", "autorun.sh": f"echo ran >> {marker}\n"})
    d = Delivery(r, evil)
    results(await r.post("/keys/vkey", d.v_body))
    resp = await r.post("/keys/ukey", d.u_body)
    assert resp.status_code == 400
    assert not (r.data_dir / "escape.sh").exists()

    await trio.sleep(0.3)
    assert r.agent.runner is not None and r.agent.runner.completed == 0
    assert not marker.exists()
    assert not (r.data_dir / "secure" / "unzipped").exists()


def _notice(key: rsa.RSAPrivateKey, **kw: Any) -> dict[str, str]:
    msg = revocation.build_message(
        agent_id=kw.get("agent_id", "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"), ip="127.0.0.1", port=9002,
        tpm_policy='{"mask": "0x400"}', meta_data="{}", event_time=time.asctime(),
        event_id="pcr_validation.invalid_pcr_16", severity_label="emergency", context={"message": "bad"},
        notice_id=kw.get("notice_id"),
    )
    return {"msg": msg, "signature": revocation.sign_message(key, msg)}


async def test_revocation_notice_runs_actions_once(running: Running) -> None:
    r = running
    out: Path = r.out  # type: ignore[attr-defined]
    payload = make_zip(
        {
            "RevocationNotifier-cert.crt": REV_CERT,
            "action_list": "local_action.sh\n",
            "local_action.sh": f"#!/bin/sh\ncat > {out}/payload-action.json\necho payload >> {out}/actions.log\n",
        },
        modes={"local_action.sh": 0o755},
    )
    d = Delivery(r, payload)
    results(await r.post("/keys/ukey", d.u_body))
    results(await r.post("/keys/vkey", d.v_body))

    notice = _notice(REV_KEY)
    assert r.agent.runner is not None
    results(await r.post("/notifications/revocation", notice))
    with trio.fail_after(10):
        await r.agent.runner.wait_completed(2)
    log = (out / "actions.log").read_text().split()
    assert sorted(log) == ["action", "payload"]
    got = json.loads((out / "payload-action.json").read_text())
    assert got == json.loads(notice["msg"])  # the notice's msg on stdin

    # delivered twice: acknowledged, not run again
    resp = await r.post("/notifications/revocation", notice)
    assert resp.status_code == 200 and "already" in resp.json()["status"]
    await trio.sleep(0.3)
    assert r.agent.runner.completed == 2

    # forged (other key), unsigned, and tampered notices are refused; nothing runs
    forged = _notice(OTHER_KEY)
    unsigned = dict(_notice(REV_KEY), signature="")
    good = _notice(REV_KEY)
    tampered = {"msg": good["msg"].replace("emergency", "info"), "signature": good["signature"]}
    for bad in (forged, unsigned, tampered):
        resp = await r.post("/notifications/revocation", bad)
        assert resp.status_code == 403, resp.text
    await trio.sleep(0.3)
    assert r.agent.runner.completed == 2
    assert len((out / "actions.log").read_text().split()) == 2


async def test_configured_revocation_cert_and_seen_ids_survive_restart(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    cert = tmp_path / "rev.crt"
    cert.write_text(REV_CERT)
    actions = tmp_path / "actions"
    actions.mkdir()
    (actions / "a.sh").write_text(f"#!/bin/sh\necho x >> {tmp_path}/ran\n")
    (actions / "a.sh").chmod(0o755)
    opts = {"revocation_cert": str(cert), "revocation_actions_dir": str(actions)}
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, **opts)
    notice = _notice(REV_KEY, notice_id="n-1")
    assert (await r.post("/notifications/revocation", _notice(OTHER_KEY))).status_code == 403
    results(await r.post("/notifications/revocation", notice))
    assert r.agent.runner is not None
    with trio.fail_after(10):
        await r.agent.runner.wait_completed(1)
    await r.stop()

    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, **opts)
    resp = await r.post("/notifications/revocation", notice)
    assert resp.status_code == 200 and "already" in resp.json()["status"]
    await trio.sleep(0.2)
    assert (tmp_path / "ran").read_text() == "x\n"
    await r.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_secure_dir_tmpfs(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    secure = tmp_path / "secure"
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, secure_dir=str(secure), secure_mount="always",
                          secure_size="2m", enable_autorun=False)
    try:
        assert os.path.ismount(secure)
        marker = tmp_path / "never"
        d = Delivery(r, make_zip({"autorun.sh": f"echo ran > {marker}\n", "secret.txt": "s3cret"}))
        results(await r.post("/keys/ukey", d.u_body))
        results(await r.post("/keys/vkey", d.v_body))
        assert (secure / "unzipped" / "secret.txt").read_text() == "s3cret"
        await trio.sleep(0.2)
        assert not marker.exists()  # enable_autorun = false
    finally:
        await r.stop()
    assert not os.path.ismount(secure)  # unmounted at shutdown: the payload is gone
    assert not (secure / "unzipped").exists()
