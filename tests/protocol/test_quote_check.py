"""protocol.quote_check: every tampering gives its typed failure; nothing forged is ever valid."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import quote, quote_check, tpm2
from keytrio.protocol.failures import Severity
from keytrio.protocol.quote_check import QUOTE_VALIDATION, check_pcr16, check_quote
from tests.protocol.quote_support import make_attest, make_quote, pcr_values, sign_attest
from tests.protocol.tpm2_support import ak_public, key_pem, private_key

NONCE = "abcdefghij0123456789"


def _check(text, kind="rsa", **kw):
    kw.setdefault("nonce", NONCE)
    kw.setdefault("hash_alg", "sha256")
    if "ak_public" not in kw:
        kw["ak_public"] = ak_public(kind, hash_alg=kw["hash_alg"])
    return check_quote(text, **kw)


@pytest.mark.parametrize(
    ("kind", "bank"), [("rsa", "sha256"), ("rsa", "sha384"), ("p256", "sha256"), ("p384", "sha512")]
)
def test_valid_quote(kind, bank):
    pcrs = pcr_values(bank, [0, 1, 2, 10, 16])
    text = make_quote(kind, bank, pcrs)
    r = _check(
        text, kind, hash_alg=bank, accepted_hash_algs=[bank], previous_clock=quote.ClockInfo(99, 3, 1, 1)
    )
    assert r.valid, r.failures
    assert r.failures == []
    assert r.pcrs == pcrs
    assert r.bank == bank
    assert r.clock == quote.ClockInfo(100_000, 3, 1, 1)
    # the AK given as marshalled bytes and as a prepared AkKey
    ak = ak_public(kind, hash_alg=bank)
    assert check_quote(text, ak_public=ak.marshal(), nonce=NONCE, hash_alg=bank).valid
    assert check_quote(quote.parse_quote(text), ak_public=tpm2.ak_key(ak), nonce=NONCE, hash_alg=bank).valid


def test_valid_rsapss_quote():
    attest = make_attest()
    text = quote.build_quote(
        attest,
        sign_attest(attest, "rsa", "sha256", "rsapss"),
        quote.encode_pcr_blob("sha256", pcr_values("sha256", [0, 1, 2, 10, 16])),
    )
    assert _check(text, ak_public=ak_public("rsa", "rsapss")).valid


def _only(r, check, event_id="qoute_validation.quote_validation"):
    assert not r.valid
    assert r.checks_failed() == [check], r.failures
    f = r.failures[0]
    assert f.event_id == event_id
    assert f.context["check"] == check and f.context["message"]
    assert f.severity == Severity.EMERGENCY and not f.recoverable


def test_wrong_nonce():
    _only(_check(make_quote(), nonce="abcdefghij012345678X"), "nonce")
    _only(_check(make_quote(nonce=b"other")), "nonce")
    _only(_check(make_quote(), nonce="abcdéfghij0123456789"), "nonce")


def test_tampered_pcr_value():
    pcrs = pcr_values("sha256", [0, 1, 2, 10, 16])
    attest = make_attest(pcrs=pcrs)
    forged = {**pcrs, 10: bytes(32)}
    text = quote.build_quote(attest, sign_attest(attest), quote.encode_pcr_blob("sha256", forged))
    _only(_check(text), "pcr_digest")


def test_pcr_select_differs_from_blob():
    # the TPM quoted PCRs 0,1 but the agent sends 0,1,2 (digest over what was sent, signature good)
    pcrs = pcr_values("sha256", [0, 1, 2])
    attest = make_attest(pcrs=pcrs, select=("sha256", [0, 1]))
    text = quote.build_quote(attest, sign_attest(attest), quote.encode_pcr_blob("sha256", pcrs))
    _only(_check(text), "pcr_select")
    # quoted the sha1 bank, sends values claiming sha256
    attest = make_attest(pcrs=pcrs, select=("sha1", [0, 1, 2]))
    text = quote.build_quote(attest, sign_attest(attest), quote.encode_pcr_blob("sha256", pcrs))
    _only(_check(text), "pcr_select")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_change_to_attest_or_signature_is_invalid(data):
    kind = data.draw(st.sampled_from(["rsa", "p256"]))
    text = make_quote(kind)
    a, s, p = text[1:].split(":")
    part = data.draw(st.sampled_from([0, 1]))
    raw = bytearray(base64.b64decode((a, s)[part]))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    parts = [a, s, p]
    parts[part] = base64.b64encode(bytes(raw)).decode()
    r = _check("r" + ":".join(parts), kind)
    assert not r.valid


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_change_to_a_pcr_value_is_invalid(data):
    bank = data.draw(st.sampled_from(["sha1", "sha256", "sha384"]))
    pcrs = pcr_values(bank, sorted(data.draw(st.sets(st.integers(0, 23), min_size=1))))
    text = make_quote("rsa", bank, pcrs)
    victim = data.draw(st.sampled_from(sorted(pcrs)))
    pos = data.draw(st.integers(0, len(pcrs[victim]) - 1))
    forged = dict(pcrs)
    value = bytearray(forged[victim])
    value[pos] ^= 1
    forged[victim] = bytes(value)
    a, s, _ = text[1:].split(":")
    blob = base64.b64encode(quote.encode_pcr_blob(bank, forged)).decode()
    r = _check(f"r{a}:{s}:{blob}", hash_alg=bank, ak_public=ak_public("rsa", hash_alg=bank))
    assert r.checks_failed() == ["pcr_digest"]


def test_tampered_signature_and_wrong_key():
    text = make_quote()
    a, s, p = text[1:].split(":")
    sig = bytearray(base64.b64decode(s))
    sig[-1] ^= 1
    _only(_check(f"r{a}:{base64.b64encode(bytes(sig)).decode()}:{p}"), "signature")
    # right shape, other key
    _only(_check(text, ak_public=ak_public("rsa2")), "signature")
    # attest changed after signing (clock moved forward to look fresh)
    attest = make_attest(clock=(1, 3, 1, 1))
    later = make_attest(clock=(10**9, 3, 1, 1))
    blob = quote.encode_pcr_blob("sha256", pcr_values("sha256", [0, 1, 2, 10, 16]))
    _only(_check(quote.build_quote(later, sign_attest(attest), blob)), "signature")


def test_key_type_mismatch_is_never_valid():
    # ECDSA signature checked against an RSA AK
    r = _check(make_quote("p256"), ak_public=ak_public("rsa"))
    assert not r.valid
    assert "signature" in r.checks_failed() and "algorithm" in r.checks_failed()


def test_algorithm_policy():
    text = make_quote("p256")
    # upstream's ids for an algorithm the agent's record does not accept
    r = _check(text, "p256", accepted_sign_algs=["rsassa", "ecschnorr"])
    _only(r, "algorithm", "qoute_validation.invalid_sign_alg")
    r = _check(text, "p256", accepted_hash_algs=["sha384", "sha512"])
    _only(r, "algorithm", "qoute_validation.invalid_hash_alg")
    # the AK's scheme says sha384 but the quote was signed with sha256
    r = _check(text, "p256", ak_public=ak_public("p256", hash_alg="sha384"))
    _only(r, "algorithm")
    # the agent claims sha384 for a sha256 quote: algorithm and bank both wrong
    r = _check(text, "p256", hash_alg="sha384", ak_public=ak_public("p256"))
    assert not r.valid
    assert set(r.checks_failed()) == {"algorithm", "pcr_select"}
    r = _check(text, "p256", hash_alg="md5", ak_public=ak_public("p256"))
    assert not r.valid
    assert "qoute_validation.invalid_hash_alg" in {f.event_id for f in r.failures}


def test_sha1_bank_signed_with_sha256_is_reported():
    # a TPM hashes the PCR values with the signing scheme's hash; keytrio wants bank == hash_alg
    pcrs = pcr_values("sha1", [0, 16])
    attest = make_attest(bank="sha1", pcrs=pcrs, digest_alg="sha256")
    text = quote.build_quote(
        attest, sign_attest(attest, "rsa", "sha256"), quote.encode_pcr_blob("sha1", pcrs)
    )
    r = _check(text, hash_alg="sha1", ak_public=ak_public("rsa"))
    assert r.checks_failed() == ["algorithm"]  # digest and signature verify, only the policy fails


@pytest.mark.parametrize(
    ("current", "previous", "ok"),
    [
        ((100, 3, 1, 1), None, True),
        ((100, 3, 1, 0), None, False),  # not safe
        ((100, 3, 1, 1), (99, 3, 1, 1), True),
        ((100, 3, 1, 1), (100, 3, 1, 1), False),  # clock did not move
        ((100, 3, 1, 1), (200, 3, 1, 1), False),  # clock went back
        ((300, 2, 1, 1), (200, 3, 1, 1), False),  # resetCount decreased
        ((300, 3, 0, 1), (200, 3, 1, 1), False),  # restartCount decreased within one reset
        ((300, 4, 0, 1), (200, 3, 5, 1), True),  # a TPM reset restarts restartCount
        ((300, 3, 2, 1), (200, 3, 1, 1), True),
    ],
)
def test_clock_checks(current, previous, ok):
    text = make_quote(clock=current)
    prev = quote.ClockInfo(*previous) if previous else None
    r = _check(text, previous_clock=prev)
    if ok:
        assert r.valid, r.failures
    else:
        _only(r, "clock")
        assert r.failures[0].context["current"]["clock"] == current[0]
    # /verify/* skips the clock check
    assert _check(text, previous_clock=prev, check_clock_info=False).valid


def test_undecodable_quote_and_ak():
    # parts that base64-decode but do not parse: upstream's checkquote fails -> quote_validation
    r = _check("rAAAA:BBBB:CCCC")
    _only(r, "decode")
    assert r.pcrs == {} and r.clock is None
    # what upstream cannot even split and decode (it raises -> invalid_quote)
    good = make_quote()
    attest, rest = good[1:].split(":", 1)
    for text in (12, "x" + good[1:], good.rsplit(":", 1)[0], f"r{attest[:-1]}:{rest}"):
        _only(_check(text), "decode", "qoute_validation.invalid_quote")
    r = _check(make_quote(), ak_public=b"\x00\x01\x02")
    _only(r, "ak", "qoute_validation.invalid_quote")
    assert r.pcrs  # decoded values are still reported


def test_nonce_as_base64():
    text = make_quote(nonce=b"raw-nonce-bytes\x00\xff")
    b64 = base64.b64encode(b"raw-nonce-bytes\x00\xff").decode()
    _only(_check(text, nonce=b64), "nonce")  # the attestation loop compares raw text only
    assert _check(text, nonce=b64, nonce_base64=True).valid
    # upstream's lenient decoder skips characters outside the alphabet (a wrapped line)
    assert _check(text, nonce=b64[:8] + "\n" + b64[8:], nonce_base64=True).valid
    _only(_check(text, nonce=b64[:-1], nonce_base64=True), "nonce")  # padding missing: not base64
    _only(_check(text, nonce=base64.b64encode(b"other").decode(), nonce_base64=True), "nonce")
    # the raw form still works with base64 allowed
    assert _check(make_quote(), nonce_base64=True).valid


def test_required_pcrs():
    r = _check(make_quote(), required_pcrs=[0, 16, 17])
    assert not r.valid
    assert [f.event_id for f in r.failures] == ["pcr_validation.missing_pcrs"]
    assert r.failures[0].context["data"] == [17]
    assert _check(make_quote(), required_pcrs=[0, 16]).valid


@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384"])
def test_check_pcr16(bank):
    nk = key_pem(private_key("rsa2")).decode()
    good = tpm2.pcr16_binding_value(bank, nk)
    assert check_pcr16(bank, {16: good, 0: bytes(len(good))}, nk) is None
    f = check_pcr16(bank, {16: bytes(len(good))}, nk)
    assert f is not None and f.event_id == "pcr_validation.invalid_pcr_16"
    assert f.context == {"got": "00" * len(good), "expected": good.hex()}
    f = check_pcr16(bank, {0: good}, nk)
    assert f is not None and f.event_id == "pcr_validation.missing_pcr_16"
    assert check_pcr16(bank, {16: good}, key_pem(private_key("rsa")).decode()) is not None


def test_module_constants():
    assert QUOTE_VALIDATION == "qoute_validation.quote_validation"
    assert set(quote_check.CHECKS) >= {"signature", "nonce", "pcr_digest", "pcr_select", "clock"}


def test_check_is_fast():
    ak = tpm2.ak_key(ak_public("rsa"))
    parsed = quote.parse_quote(make_quote())
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        assert check_quote(parsed, ak_public=ak, nonce=NONCE, hash_alg="sha256").valid
    per_check = (time.perf_counter() - t) / n
    print(f"\n{per_check * 1e3:.3f} ms per quote check")  # informational: docs/performance.md measures it
