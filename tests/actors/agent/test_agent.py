"""The agent actor over real mTLS on a real swtpm: quotes, identity persistence, TLS refusals.

Payload/keys/revocation tests: test_agent_keys.py; registration: test_agent_registration.py;
bad-input table: test_agent_badinput.py. Shared helpers: tests/actors/agent_support.py.
"""

from __future__ import annotations

import base64
import ssl
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from keytrio.actors.agent.actor import Agent
from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.protocol import ima
from keytrio.protocol.quote import parse_quote
from keytrio.protocol.quote_check import check_pcr16, check_quote
from keytrio.testbed.ima_log import ImaLog
from tests.actors.agent_support import (
    BOOTTIME,
    NONCE,
    Running,
    agent_options,
    client_for,
    results,
    start_agent,
    verify_quote,
)
from tests.ports import free_port

pytestmark = pytest.mark.swtpm


# --- quotes ------------------------------------------------------------------------------------


async def test_version_pubkey_and_identity_quote(running: Running) -> None:
    r = running
    assert results(await r.client.get(r.root + "/version")) == {
        "supported_version": "2.1", "supported_versions": ["2.1"]}
    assert results(await r.get("/keys/pubkey"))["pubkey"] == r.info.nk_pem

    res = results(await r.get("/quotes/identity", nonce=NONCE))
    assert res["pubkey"] == r.info.nk_pem
    assert (res["hash_alg"], res["enc_alg"], res["sign_alg"]) == ("sha256", "rsa", "rsassa")
    assert res["boottime"] == BOOTTIME
    pcrs = verify_quote(r, res)
    assert sorted(pcrs) == [16]

    # a different nonce does not verify: the check can fail
    bad = check_quote(res["quote"], ak_public=r.info.ak_public, nonce="other", hash_alg="sha256")
    assert not bad.valid


async def test_integrity_quote_ima_tail_and_boot_log(running: Running) -> None:
    r = running
    assert r.agent.tpm is not None
    log = ImaLog(r.ima_path, r.agent.tpm.extend, ["sha1", "sha256", "sha384"])
    for i in range(5):
        await log.measure(f"/usr/bin/tool{i}", f"content {i}".encode())
    uefi = b"\x00\x01binary event log\xff"
    Path(r.agent.config.measuredboot_ml_path).write_bytes(uefi)

    res = results(await r.get("/quotes/integrity", nonce=NONCE, mask="0x401", partial="0", ima_ml_entry="0"))
    pcrs = verify_quote(r, res)
    assert sorted(pcrs) == [0, 10, 16]
    assert res["pubkey"] == r.info.nk_pem and res["boottime"] == BOOTTIME
    assert res["ima_measurement_list_entry"] == 0
    assert res["ima_measurement_list"] == log.text()
    entries = ima.parse_list(res["ima_measurement_list"])
    assert ima.replay(entries, "sha256") == pcrs[10]
    assert base64.b64decode(res["mb_measurement_list"]) == uefi

    lines = log.lines()
    # tail rules: middle, == len (empty), beyond (whole list from 0)
    for asked, want_entry, want_lines in ((2, 2, lines[2:]), (5, 5, []), (9, 0, lines)):
        res = results(await r.get("/quotes/integrity", nonce=NONCE, mask="0x400", partial="1",
                                  ima_ml_entry=str(asked)))
        assert res["ima_measurement_list_entry"] == want_entry, asked
        assert res["ima_measurement_list"] == "".join(line + "\n" for line in want_lines), asked
        assert "pubkey" not in res  # partial=1
        assert "mb_measurement_list" not in res  # PCR 0 not asked
        verify_quote(r, res)

    # no PCR 10 in the mask: no IMA list, PCR 16 still there
    res = results(await r.get("/quotes/integrity", nonce=NONCE, mask="0x1"))
    assert "ima_measurement_list" not in res
    assert sorted(verify_quote(r, res)) == [0, 16]


async def test_quote_while_pcr10_is_extended(running: Running) -> None:
    r = running
    assert r.agent.tpm is not None
    log = ImaLog(r.ima_path, r.agent.tpm.extend, ["sha1", "sha256", "sha384"])
    await log.measure("/boot/first", b"first")
    stop = trio.Event()
    checked = 0

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            await log.measure(f"/tmp/f{i}", str(i).encode())
            i += 1
            await trio.sleep(0)

    async def quoter(n: int) -> None:
        nonlocal checked
        nonce = f"nonce{n}"
        res = results(await r.get("/quotes/integrity", nonce=nonce, mask="0x400", partial="1", ima_ml_entry="0"))
        pcrs = verify_quote(r, res, nonce)
        # the list may run ahead of the quoted PCR 10, never behind: some prefix replays to it
        entries = ima.parse_list(res["ima_measurement_list"])
        assert ima.match_prefix(entries, "sha256", pcrs[10]) is not None
        checked += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        async with trio.open_nursery() as quotes:
            for n in range(12):  # concurrent requests queue on the TPM
                quotes.start_soon(quoter, n)
        stop.set()
    assert checked == 12
    assert len(log) > 1


# --- identity persistence ------------------------------------------------------------------------


async def test_restart_keeps_identity(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    first = await start_agent(nursery, tmp_path, pki, swtpm.tcti)
    info1 = first.info
    await first.stop()
    second = await start_agent(nursery, tmp_path, pki, swtpm.tcti)
    try:
        info2 = second.info
        assert info2.agent_id == info1.agent_id
        assert info2.ak_public == info1.ak_public
        assert info2.nk_pem == info1.nk_pem
        assert info2.mtls_cert == info1.mtls_cert
        assert info2.ek_public == info1.ek_public
        for name in ("nk-private.pem", "ak.json"):
            assert stat.S_IMODE((second.data_dir / name).stat().st_mode) == 0o600, name
        # PCR 16 is bound again after the restart and the old AK still quotes
        verify_quote(second, results(await second.get("/quotes/identity", nonce=NONCE)))
    finally:
        await second.stop()


async def test_uuid_settings(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from keytrio.actors.agent.tpm import public_key

    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, uuid="hash_ek")
    pem = public_key(r.info.ek_public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert r.info.agent_id == hashlib.sha256(pem).hexdigest()
    await r.stop()
    fixed = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
    # a UUID is normalised as the registrar does (it keys the activation HMAC by that form)
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, uuid=fixed.upper())
    assert r.info.agent_id == fixed
    await r.stop()


# --- TLS -----------------------------------------------------------------------------------------


async def test_tls_refuses_clients_without_trusted_cert(running: Running, pki: Any) -> None:
    r = running
    for cert in (None, pki.other_client):
        async with client_for(pki, r.info, cert=cert) as c:
            with pytest.raises((httpx.TransportError, ssl.SSLError)):
                resp = await c.get(r.base + "/keys/pubkey")
                # TLS 1.3: the server's refusal may only surface when the response is read
                resp.raise_for_status()
    # the server keeps serving trusted clients
    assert results(await r.get("/keys/pubkey"))["pubkey"] == r.info.nk_pem


async def test_unsupported_version_and_unknown_route(running: Running) -> None:
    r = running
    resp = await r.client.get(r.root + "/v2.5/keys/pubkey")
    assert resp.status_code == 400 and "API version not supported" in resp.json()["status"]
    resp = await r.client.get(r.root + "/v2.1/nothing/here")
    assert resp.status_code == 404 and resp.json()["code"] == 404


# --- several agents in one process, other algorithms ---------------------------------------------


async def test_three_agents_in_one_process(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm_factory: Any) -> None:
    tpms = [await swtpm_factory(fresh=False) for _ in range(3)]
    agents = [await start_agent(nursery, tmp_path / f"a{i}", pki, t.tcti) for i, t in enumerate(tpms)]
    assert len({a.info.agent_id for a in agents}) == 3
    assert len({a.info.nk_pem for a in agents}) == 3

    async def check(a: Running) -> None:
        verify_quote(a, results(await a.get("/quotes/integrity", nonce=NONCE, mask="0x1")))

    async with trio.open_nursery() as n:
        for a in agents:
            n.start_soon(check, a)
    # an agent's quote does not verify with another agent's NK binding
    res = results(await agents[0].get("/quotes/identity", nonce=NONCE))
    check_ = check_quote(res["quote"], ak_public=agents[0].info.ak_public, nonce=NONCE, hash_alg="sha256")
    assert check_pcr16(check_.bank, check_.pcrs, agents[1].info.nk_pem) is not None
    for a in agents:
        await a.stop()


async def test_ecc_ak_and_sha384_bank(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, tpm_encryption_alg="ecc",
                          tpm_signing_alg="ecdsa", tpm_hash_alg="sha384")
    res = results(await r.get("/quotes/identity", nonce=NONCE))
    assert (res["hash_alg"], res["enc_alg"], res["sign_alg"]) == ("sha384", "ecc", "ecdsa")
    assert parse_quote(res["quote"]).bank == "sha384"
    verify_quote(r, res)
    await r.stop()


# --- configuration and command line --------------------------------------------------------------


def test_config_problems_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from keytrio.actors.agent import cli
    from keytrio.actors.agent import config as agent_config
    from keytrio.actors.agent.actor import AgentConfigError
    from keytrio.actors.common.config import ConfigError

    with pytest.raises(ConfigError) as err:
        agent_config.load(None, env={}, overrides={"uuid": "not a uuid!", "ek_handle": "0x1234",
                                                   "tpm_hash_alg": "md5", "secure_size": "lots"})
    text = "\n".join(err.value.problems)
    for key in ("uuid", "ek_handle", "tpm_hash_alg", "secure_size"):
        assert key in text
    for good in ("foo", "a.b-c_1", "wörk-1", "generate", "hash_ek"):  # upstream's [\w.-]+
        assert agent_config.load(None, env={}, overrides={"uuid": good}).uuid == good
    for bad in ("a/b", "a b", "x" * 81, ".."):
        with pytest.raises(ConfigError, match="uuid"):
            agent_config.load(None, env={}, overrides={"uuid": bad})
    with pytest.raises(AgentConfigError):
        Agent.from_options()  # no trusted_client_ca
    cfg = agent_config.load(None, env={"KEYTRIO_AGENT_EK_HANDLE": "0x81010001"})
    assert cfg.ek_handle == 0x81010001

    parser = argparse.ArgumentParser(prog="keytrio")
    sub = parser.add_subparsers(dest="verb")
    cli.register(sub)
    args = parser.parse_args(["agent", "--print-default-config"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "[agent]" in out and 'tpm_hash_alg = "sha256"' in out
    # the printed default parses back (with the required CA filled in)
    path = tmp_path / "agent.toml"
    path.write_text(out.replace("trusted_client_ca = []", 'trusted_client_ca = ["/x/ca.pem"]'))
    assert agent_config.load(path, env={}).trusted_client_ca == ["/x/ca.pem"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nport = 'x'\nnope = 1\n")
    args = parser.parse_args(["agent", "--config", str(bad)])
    assert args.func(args) == 2
    assert "nope" in capsys.readouterr().err


async def test_persistent_ek_handle(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> None:
    from keytrio.actors.agent.tpm import Tpm

    # swtpm_setup leaves the RSA EK persisted at 0x81010001 (TCG's EK handle)
    async with await Tpm.open(swtpm.tcti) as tpm:
        ek = await tpm.endorsement_key(handle=0x81010001)
        assert ek.public == (await tpm.endorsement_key()).public
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti, ek_handle="0x81010001")
    assert r.info.ek_public == ek.public and r.info.ek_cert_der is not None
    verify_quote(r, results(await r.get("/quotes/identity", nonce=NONCE)))
    await r.stop()


async def test_cli_process_serves_and_stops_on_sigterm(tmp_path: Path, pki: Any, swtpm: Any) -> None:
    import signal
    import subprocess
    import sys

    port = free_port()
    opts = agent_options(tmp_path, pki, swtpm.tcti, port=port)
    lines = ["[agent]"]
    for key, value in opts.items():
        lines.append(f"{key} = {json_toml(value)}")
    conf = tmp_path / "agent.toml"
    conf.write_text("\n".join(lines) + "\n")
    code = ("import argparse, sys; from actors.agent import cli; p = argparse.ArgumentParser(); "
            "cli.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = await trio.lowlevel.open_process([sys.executable, "-c", code, "agent", "--config", str(conf)],
                                            stderr=subprocess.DEVNULL)
    try:
        cert_path = Path(opts["data_dir"]) / "nk-cert.pem"
        with trio.fail_after(20):
            while True:
                if cert_path.exists():
                    try:
                        await trio.open_tcp_stream("127.0.0.1", port)
                        break
                    except OSError:
                        pass
                await trio.sleep(0.1)
        ctx = tls.client_context([pki.ca], pki.client.cert, pki.client.key,
                                 pinned_server_cert_pem=cert_path.read_text())
        async with make_client(ctx) as c:
            assert results(await c.get(f"https://127.0.0.1:{port}/version"))["supported_version"] == "2.1"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def json_toml(value: Any) -> str:
    import json

    return json.dumps(value)
