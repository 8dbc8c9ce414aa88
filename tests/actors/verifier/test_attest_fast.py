"""The verifier's one-pass check of a steady-state poll (attest._evaluate_fast) against the general
path (attest._evaluate_general): on good replies and on many mutated ones, the same failures (ids,
contexts, severities), the same state afterwards and the same calls into the IMA hook. Quotes are
built and signed in software (tests/protocol/quote_support.py), no TPM."""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any

import pytest

from keytrio.actors.verifier import attest
from keytrio.actors.verifier.attest import AgentTarget, AttestState
from keytrio.protocol import quote, tpm2
from keytrio.protocol.failures import Failure
from keytrio.protocol.quote import ClockInfo
from tests.actors.verifier.attest_support import (
    BANK,
    GOOD_PCRS,
    NK,
    NONCE,
    FakeBoot,
    FakeIma,
    _good_attest,
    _pcrs,
    _quote_text,
    _reply,
    _state,
    _target,
)
from tests.protocol.quote_support import make_attest, pcr_values, sign_attest
from tests.protocol.tpm2_support import ak_public


def _run(fn: Any, target: AgentTarget, state: AttestState, reply: Any, nonce: str = NONCE) -> Any:
    target, state, reply = copy.deepcopy((target, state, reply))
    try:
        result: Any = fn(target, state, reply, nonce)
    except Exception as exc:  # the general path's exceptions must be the fast path's too
        result = ("raised", type(exc).__name__, str(exc))
    fails = [dataclasses.astuple(f) for f in result] if isinstance(result, list) else result
    return fails, dataclasses.asdict(state), getattr(target.ima_check, "calls", None)


def _same(target: AgentTarget, state: AttestState, reply: Any, nonce: str = NONCE) -> list[Any]:
    """Both paths agree; the failures (as tuples)."""
    general = _run(attest._evaluate_general, target, state, reply, nonce)
    combined = _run(attest.evaluate, target, state, reply, nonce)
    assert combined == general, reply
    return general[0]


def test_good_reply_takes_the_fast_path_with_the_general_verdict() -> None:
    target, state, reply = _target(), _state(), _reply()
    assert attest._evaluate_fast(copy.deepcopy(target), copy.deepcopy(state), reply, NONCE) == []
    assert _same(target, state, reply) == []
    after = copy.deepcopy(state)
    assert attest.evaluate(target, after, reply, NONCE) == []
    assert after.clock == ClockInfo(100_000, 3, 1, 1) and after.ima_ml_entry == 7
    assert after.attestation_count == 5 and after.quotes_received == 5 and after.pcr10 == "checked"
    # without a runtime policy PCR 10 is "not checked"; without PCR 10 "not quoted"
    assert _same(_target(ima_check=None), state, reply) == []
    pcrs = _pcrs((0, 1, 2, 16))
    assert _same(_target(ima_check=None), state, _reply(_quote_text(_good_attest(pcrs=pcrs), pcrs=pcrs))) == []
    # an IMA verdict (failures and the entry to ask next) is the general path's too
    fail = Failure("ima.policy_violation", {"path": "/x"})
    assert _same(_target(ima_check=FakeIma(([fail], 6))), state, reply) != []


def _field_mutations() -> list[dict[str, Any]]:
    good = _reply()
    muts: list[dict[str, Any]] = []
    for key in ("quote", "hash_alg", "enc_alg", "sign_alg", "boottime", "ima_measurement_list",
                "ima_measurement_list_entry", "mb_measurement_list", "pubkey"):
        for value in (None, 5, -1, True, 2**64, "x", "", ["r"], {"a": 1}, 1.5):
            muts.append({**good, key: value})
        muts.append({k: v for k, v in good.items() if k != key})
    muts += [{**good, "hash_alg": "sha1"}, {**good, "hash_alg": "sha384"}, {**good, "enc_alg": "des"},
             {**good, "sign_alg": "ecdsa"}, {**good, "boottime": 999}, {**good, "quote": good["quote"][:-4]},
             {**good, "quote": "r" + good["quote"][1:].replace(":", "::", 1)}]
    return muts


def test_reply_fields_mutated() -> None:
    target, state = _target(), _state()
    for reply in [*_field_mutations(), None, [], "text", 7]:
        _same(target, state, reply)


def _attest_mutations(rng: random.Random) -> list[bytes]:
    """TPMS_ATTEST bytes with a field changed (each then signed again, so the checks after the
    signature are reached): every single byte flipped, plus the fields the checks look at."""
    raw = _good_attest()
    out = [raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:] for i in range(len(raw))]
    out += [
        _good_attest(nonce=b"another nonce 012345"),
        _good_attest(nonce=NONCE.encode()[:-1]),
        _good_attest(clock=(90_000, 3, 1, 1)), _good_attest(clock=(89_999, 3, 1, 1)),
        _good_attest(clock=(100_000, 3, 1, 0)), _good_attest(clock=(100_000, 2, 9, 1)),
        _good_attest(clock=(100_000, 3, 0, 1)), _good_attest(clock=(50, 4, 0, 1)),
        _good_attest(select=(BANK, [0, 1, 2, 10])), _good_attest(select=("sha1", [0, 1, 2, 10, 16])),
        _good_attest(digest_alg="sha384"), _good_attest(signer=b""),
    ]
    return out


def test_attest_mutated_and_signed_again() -> None:
    rng = random.Random(20)
    target, state = _target(), _state()
    verdicts: set[tuple[str, ...]] = set()
    for raw in _attest_mutations(rng):
        fails = _same(target, state, _reply(_quote_text(raw)))
        verdicts.add(tuple(sorted({f[1].get("check", f[0]) for f in fails})) if isinstance(fails, list) else fails)
    # the mutations reached the checks they aim at (not only "does not decode")
    for check in ("decode", "nonce", "clock", "pcr_select", "pcr_digest"):
        assert any(check in v for v in verdicts), (check, verdicts)


@pytest.mark.parametrize("case", [
    "pcr16", "policy_value", "policy_missing", "blob_bank", "other_signer", "sig_hash",
    "state_clock_ahead", "first_quote", "new_reset_count", "ak_ecc", "no_rsassa", "no_rsa_enc",
    "no_sha256", "policy_16_only", "mb_policy", "rsapss_by_rsassa_ak", "sha384_by_sha256_ak",
    "bank_sha1_selected", "claim_sha384_signed_sha256", "mb_check",
])
def test_checks_beyond_the_attest(case: str) -> None:
    target, state, reply = _target(), _state(), _reply()
    if case == "pcr16":
        pcrs = {**GOOD_PCRS, 16: b"\x01" * 32}
        reply = _reply(_quote_text(_good_attest(pcrs=pcrs), pcrs=pcrs))
    elif case == "policy_value":
        target = _target(tpm_policy={"0": ["ab" * 32]})
    elif case == "policy_missing":
        target = _target(tpm_policy={"0": [GOOD_PCRS[0].hex()], "7": ["ab" * 32]})
    elif case == "blob_bank":
        pcrs = pcr_values("sha1", [0, 1, 2, 10, 16])
        reply = _reply(_quote_text(_good_attest(pcrs=pcrs, digest_alg=BANK), pcrs=pcrs, blob_bank="sha1"))
    elif case == "other_signer":
        reply = _reply(_quote_text(_good_attest(), kind="rsa2"))
    elif case == "sig_hash":
        reply = _reply(_quote_text(_good_attest(), sig_hash="sha384"))
    elif case == "state_clock_ahead":
        state = _state(clock=ClockInfo(200_000, 3, 1, 1))
    elif case == "first_quote":
        state = _state(nk_pem=None, clock=None)
        reply = _reply(pubkey=NK)
    elif case == "new_reset_count":
        reply = _reply(_quote_text(_good_attest(clock=(10, 4, 0, 1))))
    elif case == "ak_ecc":
        target = _target(ak=tpm2.ak_key(ak_public("p256").marshal()))
    elif case == "no_rsassa":
        target = _target(accept_tpm_signing_algs=["ecdsa"])
    elif case == "no_rsa_enc":
        target = _target(accept_tpm_encryption_algs=["ecc"])
    elif case == "no_sha256":
        target = _target(accept_tpm_hash_algs=["sha384", "md5"])
    elif case == "policy_16_only":
        target = _target(tpm_policy={"16": ["00" * 32], "mask": "0x10000"})
    elif case == "mb_policy":
        target = _target(mb_policy="{}")
    elif case == "rsapss_by_rsassa_ak":  # the AK's key verifies it; only the AK's scheme says no
        target = _target(accept_tpm_signing_algs=["rsassa", "rsapss"])
        raw = _good_attest()
        reply = _reply(quote.build_quote(raw, sign_attest(raw, "rsa", BANK, "rsapss"),
                                         quote.encode_pcr_blob(BANK, GOOD_PCRS)))
    elif case == "sha384_by_sha256_ak":  # bank, claim and signature agree, the AK's hash does not
        pcrs = pcr_values("sha384", [0, 1, 2, 10, 16])
        pcrs[16] = tpm2.pcr16_binding_value("sha384", NK)
        target = _target(tpm_policy={})
        reply = _reply(_quote_text(make_attest(bank="sha384", nonce=NONCE.encode(), pcrs=pcrs,
                                               clock=(100_000, 3, 1, 1)),
                                   pcrs=pcrs, sig_hash="sha384", blob_bank="sha384"), hash_alg="sha384")
    elif case == "bank_sha1_selected":  # attest and blob agree on sha1; the claim is sha256
        pcrs = pcr_values("sha1", [0, 1, 2, 10, 16])
        pcrs[16] = tpm2.pcr16_binding_value("sha1", NK)
        target = _target(tpm_policy={})
        reply = _reply(_quote_text(_good_attest(pcrs=pcrs, digest_alg=BANK, select=("sha1", sorted(pcrs))),
                                   pcrs=pcrs, blob_bank="sha1"))
    elif case == "claim_sha384_signed_sha256":  # only the claim names sha384
        pcrs = pcr_values("sha384", [0, 1, 2, 10, 16])
        pcrs[16] = tpm2.pcr16_binding_value("sha384", NK)
        target = _target(tpm_policy={})
        reply = _reply(_quote_text(make_attest(bank="sha384", digest_alg=BANK, nonce=NONCE.encode(), pcrs=pcrs,
                                               clock=(100_000, 3, 1, 1)), pcrs=pcrs, blob_bank="sha384"),
                       hash_alg="sha384")
    elif case == "mb_check":  # a measured-boot check is the general path's
        target._mb_check = FakeBoot()  # type: ignore[assignment]
    _same(target, state, reply)
