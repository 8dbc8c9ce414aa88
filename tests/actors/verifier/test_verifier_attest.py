"""One verifier attestation round (actors.verifier.attest) against a real agent on a real swtpm."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_ASYM_SCHEME

from keytrio.actors.common.client import make_client, request_json
from keytrio.actors.verifier import attest
from keytrio.actors.verifier.attest import AgentTarget, AttestState
from keytrio.protocol import evidence, payload, tpm2
from keytrio.protocol.quote import parse_quote
from keytrio.protocol.quote_check import QUOTE_VALIDATION
from tests.actors.agent_support import Running, start_agent
from tests.actors.registrar_support import AK_ATTRS, SoftTpm, _spki_pem

pytestmark = pytest.mark.swtpm


@pytest.fixture
async def running(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> AsyncIterator[Running]:
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti)
    yield r
    await r.stop()


def target_for(r: Running, **changes: Any) -> AgentTarget:
    host, port = r.info.address
    fields: dict[str, Any] = {
        "agent_id": r.info.agent_id,
        "ip": host,
        "port": port,
        "mtls_cert": r.info.mtls_cert,
        "ak": tpm2.ak_key(r.info.ak_public),
        "tpm_policy": {"mask": "0x0"},
        "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
        "accept_tpm_signing_algs": ["ecschnorr", "rsassa"],
        "accept_tpm_encryption_algs": ["ecc", "rsa"],
    }
    fields.update(changes)
    return AgentTarget(**fields)


@pytest.fixture
async def client(pki: Any, running: Running) -> AsyncIterator[httpx.AsyncClient]:
    ctx = attest.agent_ssl_context([pki.ca], pki.client.cert, pki.client.key, running.info.mtls_cert)
    async with make_client(ctx, timeout=20.0) as c:
        yield c


def ids(fails: list[Any]) -> list[str]:
    return [f.event_id for f in fails]


def rsa_ak() -> TPM2B_PUBLIC:
    """An RSA-2048 RSASSA-SHA256 AK public that is not the agent's (same algorithms, other key)."""
    key = rsa.generate_private_key(65537, 2048)
    scheme = TPMT_ASYM_SCHEME(scheme=TPM2_ALG.RSASSA)
    scheme.details.rsassa.hashAlg = TPM2_ALG.SHA256
    return TPM2B_PUBLIC.from_pem(_spki_pem(key), objectAttributes=AK_ATTRS, scheme=scheme)


async def test_two_rounds_then_partial(running: Running, client: httpx.AsyncClient) -> None:
    target = target_for(running)
    state = AttestState()
    assert await attest.attest_once(client, target, state) == []
    assert state.nk_pem == running.info.nk_pem  # from the partial=0 reply
    assert state.clock is not None and state.boottime is not None
    first_clock = state.clock
    assert state.pcr10 == evidence.PCR10_NOT_QUOTED

    # second round asks partial=1: the reply carries no pubkey, the stored NK is used
    nonce = attest.new_nonce()
    reply = await attest.fetch_quote(client, target, state, nonce)
    assert "pubkey" not in reply
    assert attest.evaluate(target, state, reply, nonce) == []
    assert state.attestation_count == 2
    assert state.clock.clock > first_clock.clock

    # the same reply again is a replay: its nonce and its clock are stale
    fails = attest.evaluate(target, state, reply, attest.new_nonce())
    checks = [f.context.get("check") for f in fails]
    assert ids(fails) and set(ids(fails)) == {QUOTE_VALIDATION}
    assert "nonce" in checks and "clock" in checks
    assert state.attestation_count == 2  # unchanged on failure


async def test_policy_pcr_mismatch(running: Running, client: httpx.AsyncClient) -> None:
    # learn PCR 0 from a good quote, then enrol a policy that expects something else
    target = target_for(running, tpm_policy={"mask": "0x1"})
    state = AttestState()
    nonce = attest.new_nonce()
    reply = await attest.fetch_quote(client, target, state, nonce)
    pcr0 = parse_quote(reply["quote"]).pcrs[0].hex()

    good = target_for(running, tpm_policy={"mask": "0x1", "0": ["00" * 32, pcr0]})
    assert attest.evaluate(good, AttestState(), reply, nonce) == []

    bad = target_for(running, tpm_policy={"mask": "0x1", "0": ["ab" * 32]})
    state = AttestState()
    fails = await attest.attest_once(client, bad, state)
    assert ids(fails) == ["pcr_validation.invalid_pcr_0"]
    assert fails[0].context == {"pcr": 0, "got": pcr0, "expected": ["ab" * 32]}
    assert state.attestation_count == 0 and state.nk_pem is None  # state untouched


async def test_other_ak_fails_signature(running: Running, client: httpx.AsyncClient) -> None:
    target = target_for(running, ak=tpm2.ak_key(rsa_ak()))
    fails = await attest.attest_once(client, target, AttestState())
    assert ids(fails) == [QUOTE_VALIDATION]
    assert fails[0].context["check"] == "signature"

    # an ECDSA AK (another kind of TPM): algorithm and signature both fail
    soft = target_for(running, ak=tpm2.ak_key(SoftTpm.new().ak),
                      accept_tpm_signing_algs=["rsassa", "ecdsa"])
    checks = [f.context["check"] for f in await attest.attest_once(client, soft, AttestState())]
    assert "signature" in checks and "algorithm" in checks


async def test_pcr16_extended(running: Running, client: httpx.AsyncClient) -> None:
    target = target_for(running)
    state = AttestState()
    assert await attest.attest_once(client, target, state) == []
    assert running.agent.tpm is not None
    await running.agent.tpm.extend(16, {"sha256": hashlib.sha256(b"evil").digest()})
    fails = await attest.attest_once(client, target, state)
    assert ids(fails) == ["pcr_validation.invalid_pcr_16"]


async def test_pcr10_without_runtime_policy_is_not_checked(running: Running, client: httpx.AsyncClient) -> None:
    # PCR 10 asked by the tpm_policy mask but no runtime policy: recorded as "not checked"
    target = target_for(running, tpm_policy={"mask": "0x400"})
    state = AttestState()
    assert await attest.attest_once(client, target, state) == []
    assert state.pcr10 == evidence.PCR10_NOT_CHECKED


async def test_hostile_replies(running: Running, client: httpx.AsyncClient) -> None:
    target = target_for(running)
    state = AttestState()
    nonce = attest.new_nonce()
    good = await attest.fetch_quote(client, target, state, nonce)
    assert attest.evaluate(target, AttestState(), dict(good), nonce) == []

    junk_quote = "r" + base64.b64encode(os.urandom(80)).decode() + ":AAAA:AAAA"
    hostile: list[Any] = [
        None, [], "text", 7,
        {k: v for k, v in good.items() if k != "quote"},
        {**good, "quote": 12345},
        {**good, "quote": ["r"]},
        {**good, "quote": "garbage"},
        {**good, "quote": junk_quote},
        {**good, "quote": "r" + "\udcff" * 10},
        {**good, "quote": good["quote"][:-8]},
        {**good, "hash_alg": None},
        {**good, "hash_alg": "md5"},
        {**good, "hash_alg": {"x": 1}},
        {**good, "enc_alg": "des"},
        {**good, "pubkey": 3},
        {**good, "pubkey": "not a pem"},
        {**good, "boottime": "yesterday"},
        {**good, "ima_measurement_list": 5},
        {**good, "ima_measurement_list_entry": -1},
    ]
    for reply in hostile:
        st = AttestState()
        fails = attest.evaluate(target, st, reply, nonce)
        assert fails, reply
        assert st.attestation_count == 0 and st.nk_pem is None, reply


async def test_deliver_v_then_u_gives_k(running: Running, client: httpx.AsyncClient) -> None:
    target = target_for(running)
    state = AttestState()
    assert await attest.attest_once(client, target, state) == []
    assert state.nk_pem is not None
    halves = payload.new_key_halves(os.urandom(64))
    await attest.deliver_v(client, target, halves.v, state.nk_pem)

    body = {
        "encrypted_key": payload.encrypt_key_half(state.nk_pem, halves.u),
        "auth_tag": payload.auth_tag(halves.k, running.info.agent_id),
    }
    await request_json(client, "POST", target.base_url + "/keys/ukey", body)
    challenge = attest.new_nonce()
    reply = await request_json(client, "GET", target.base_url + "/keys/verify", params={"challenge": challenge})
    assert reply.results["hmac"] == payload.verify_hmac(halves.k, challenge)
