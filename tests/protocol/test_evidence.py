"""protocol.evidence: the verdict of a quote and its logs, one typed failure per check (pure, in
software: quotes are built and signed by the helpers of test_quote, no TPM)."""

from __future__ import annotations

import hashlib
import json

import pytest

from keytrio.protocol import evidence as ev
from keytrio.protocol import ima, quote, tpm2
from keytrio.protocol.evidence import Evidence, Expectations, RefStateCheck, Verdict, verify
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima_eval import ImaChecker
from keytrio.protocol.quote_check import (
    INVALID_ENC_ALG,
    INVALID_HASH_ALG,
    INVALID_PCR_16,
    INVALID_QUOTE,
    INVALID_SIGN_ALG,
    MISSING_PCR_16,
    MISSING_PCRS,
    QUOTE_VALIDATION,
)
from keytrio.protocol.runtime_policy import parse_policy
from tests.protocol.quote_support import make_attest, make_quote, pcr_values, sign_attest
from tests.protocol.tpm2_support import ak_public, key_pem, private_key

NONCE = "abcdefghij0123456789"
BANK = "sha256"
NK = key_pem(private_key("rsa2")).decode()


def _pcrs(which=(0, 1, 2, 10, 16), nk: str = NK, **values: bytes) -> dict[int, bytes]:
    pcrs = pcr_values(BANK, list(which))
    if 16 in pcrs:
        pcrs[16] = tpm2.pcr16_binding_value(BANK, nk)
    pcrs.update({int(k[1:]): v for k, v in values.items()})
    return pcrs


def _expect(**kw) -> Expectations:
    kw.setdefault("ak", ak_public("rsa").marshal())
    kw.setdefault("nonce", NONCE)
    kw.setdefault("nk_pem", NK)
    return Expectations(**kw)


def _verify(pcrs: dict[int, bytes] | None = None, quote_text: str | None = None, evidence_kw=None, **kw) -> Verdict:
    text = quote_text if quote_text is not None else make_quote("rsa", BANK, _pcrs() if pcrs is None else pcrs)
    return verify(_expect(**kw), Evidence(text, BANK, "rsa", **(evidence_kw or {})))


def _ids(v: Verdict) -> list[str]:
    return [f.event_id for f in v.failures]


class FakeIma:
    """An ImaCheck that records its calls and answers what it is told."""

    def __init__(self, answer: tuple[list[Failure], int] = ([], 7)) -> None:
        self.calls: list[tuple] = []
        self.answer = answer

    def __call__(self, list_text, first_entry, pcrs, bank):
        self.calls.append((list_text, first_entry, dict(pcrs), bank))
        return self.answer


class FakeBoot:
    """A MeasuredBootCheck that records its calls."""

    def __init__(self, answer: list[Failure] | None = None) -> None:
        self.calls: list[tuple] = []
        self.answer = answer or []

    def __call__(self, log, pcrs, bank, *, evaluate_policy):
        self.calls.append((log, sorted(pcrs), bank, evaluate_policy))
        return self.answer


def test_good_quote_is_valid():
    v = _verify(accepted_hash_algs=(BANK,), accepted_sign_algs=("rsassa",), accepted_enc_algs=("rsa",),
                previous_clock=quote.ClockInfo(99, 3, 1, 1), tpm_policy={"mask": "0x7", "1": [_pcrs()[1].hex()]})
    assert v.valid and v.failures == [] and v.decoded
    assert v.check is not None and v.check.clock == quote.ClockInfo(100_000, 3, 1, 1)
    # PCR 10 quoted, no IMA check: unverified, never "checked"
    assert v.pcr10 == ev.PCR10_NOT_CHECKED and v.next_entry is None
    assert _verify(_pcrs((0, 16))).pcr10 == ev.PCR10_NOT_QUOTED
    # the AK as a prepared key and as bytes give the same verdict
    assert _verify(ak=tpm2.ak_key(ak_public("rsa"))).valid


def _quote_failure(v: Verdict, check: str, event_id: str = QUOTE_VALIDATION) -> None:
    assert not v.valid
    assert _ids(v) == [event_id], v.failures
    f = v.failures[0]
    assert f.context["check"] == check and f.severity == Severity.EMERGENCY and not f.recoverable
    assert v.quote_failures == v.failures


def test_quote_checks_give_typed_failures():
    _quote_failure(_verify(nonce="abcdefghij012345678X"), "nonce")
    _quote_failure(_verify(ak=ak_public("rsa2").marshal()), "signature")
    pcrs = _pcrs()
    attest = make_attest(pcrs=pcrs)
    forged = quote.build_quote(attest, sign_attest(attest), quote.encode_pcr_blob(BANK, {**pcrs, 1: bytes(32)}))
    _quote_failure(_verify(quote_text=forged, nk_pem=None), "pcr_digest")
    _quote_failure(_verify(previous_clock=quote.ClockInfo(200_000, 3, 1, 1)), "clock")
    _quote_failure(_verify(accepted_hash_algs=("sha384",)), "algorithm", INVALID_HASH_ALG)
    _quote_failure(_verify(accepted_sign_algs=("ecschnorr",)), "algorithm", INVALID_SIGN_ALG)


def test_clock_is_not_checked_when_told():
    assert _verify(previous_clock=quote.ClockInfo(200_000, 3, 1, 1), check_clock=False).valid


def test_nonce_as_base64_only_where_asked():
    import base64

    b64 = base64.b64encode(NONCE.encode()).decode()
    _quote_failure(_verify(nonce=b64), "nonce")
    assert _verify(nonce=b64, nonce_base64=True).valid


def test_undecodable_quote():
    v = _verify(quote_text="rnot:a:quote")
    assert _ids(v) == [INVALID_QUOTE] and not v.decoded and v.pcr10 == ev.PCR10_NOT_QUOTED
    # an AK that is no key at all is a typed failure too, never an exception
    v = _verify(ak=b"\x00\x01garbage")
    assert _ids(v) == [INVALID_QUOTE] and v.failures[0].context["check"] == "ak"


def test_exception_belt_is_a_typed_failure():
    # a claim of a type check_quote does not expect (an unhashable hash_alg) raises inside it
    v = verify(_expect(), Evidence(make_quote(), ["sha256"]))  # type: ignore[arg-type]
    assert _ids(v) == [INVALID_QUOTE] and v.check is None and not v.decoded
    assert v.failures[0].context["message"] == "quote could not be checked"


def test_encryption_algorithm():
    v = _verify(accepted_enc_algs=("ecc",))
    assert _ids(v) == [INVALID_ENC_ALG] and v.failures[0].context["check"] == "algorithm"
    assert v.quote_failures == [] and v.decoded  # the quote itself verified
    # with a bad quote too: the algorithm comes first, then the quote's own failures
    v = _verify(accepted_enc_algs=("ecc",), nonce="x" * 20)
    assert _ids(v) == [INVALID_ENC_ALG, QUOTE_VALIDATION]
    assert _verify(accepted_enc_algs=None).valid


def test_pcr16_binding():
    assert _ids(_verify(nk_pem=key_pem(private_key("rsa")).decode())) == [INVALID_PCR_16]
    assert _ids(_verify(_pcrs((0, 1)))) == [MISSING_PCR_16]
    assert _verify(_pcrs((0, 1)), nk_pem=None).valid  # /verify/*: no NK, no binding check
    f = _verify(nk_pem=key_pem(private_key("rsa")).decode()).failures[0]
    assert f.recoverable and f.context["got"] == _pcrs()[16].hex()


def test_required_pcrs():
    v = _verify(_pcrs((0, 1)), required_pcrs=(16,), nk_pem=None)
    assert _ids(v) == [MISSING_PCRS] and v.quote_failures == v.failures


def test_tpm_policy():
    pcrs = _pcrs()
    good = {"1": [pcrs[1].hex()], "2": ["0x" + pcrs[2].hex().upper(), "00" * 32]}
    assert _verify(tpm_policy=good).valid
    v = _verify(tpm_policy={"1": ["00" * 32]})
    assert _ids(v) == ["pcr_validation.invalid_pcr_1"]
    assert v.failures[0].context == {"pcr": 1, "got": pcrs[1].hex(), "expected": ["00" * 32]}
    v = _verify(tpm_policy={"5": ["00" * 32], "7": "11" * 32})
    assert _ids(v) == [MISSING_PCRS] and v.failures[0].context["data"] == [5, 7]
    # PCR 16 is the NK binding, never a policy value
    assert _verify(tpm_policy={"16": ["00" * 32]}).valid


def test_policy_pcrs():
    assert ev.policy_pcrs({"mask": "0x3", "0": "0xAB", "1": ["cd", 5], "x": ["00"], "2": 7}) == {
        0: ["ab"], 1: ["cd"]}


def test_ima_check_runs_only_on_a_verified_quote():
    hook = FakeIma(([], 12))
    v = _verify(ima=hook, evidence_kw={"ima_list": "lines\n", "ima_entry": 5})
    assert v.valid and v.pcr10 == ev.PCR10_CHECKED and v.next_entry == 12
    (text, entry, pcrs, bank), = hook.calls
    assert (text, entry, bank) == ("lines\n", 5, BANK) and pcrs == _pcrs()
    # a quote that does not verify: its PCR 10 is evidence of nothing, the hook never runs
    hook = FakeIma()
    v = _verify(ima=hook, nonce="x" * 20)
    assert hook.calls == [] and v.pcr10 == ev.PCR10_NOT_CHECKED and v.next_entry is None
    # PCR 10 not quoted: not run either
    hook = FakeIma()
    assert _verify(_pcrs((0, 16)), ima=hook).pcr10 == ev.PCR10_NOT_QUOTED and hook.calls == []
    # its failures join the verdict's, after the quote's and policy's
    bad = Failure("ima.test", {}, Severity.CRITICAL)
    v = _verify(ima=FakeIma(([bad], 3)), tpm_policy={"1": ["00" * 32]})
    assert _ids(v) == ["pcr_validation.invalid_pcr_1", "ima.test"] and v.next_entry == 3


def _ima_log(n: int) -> list[ima.Entry]:
    return [ima.build_entry("ima-ng", f"/usr/bin/f{i}", BANK, hashlib.sha256(b"%d" % i).digest()) for i in range(n)]


def _policy(entries: list[ima.Entry]):
    doc = {"meta": {"version": 1, "generator": 3}, "release": 0, "digests": {e.path: [e.digest.hex()] for e in entries},
           "excludes": [], "keyrings": {}, "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
           "ima-buf": {}, "verification-keys": ""}
    return parse_policy(json.dumps(doc).encode())


def test_real_ima_check():
    log = _ima_log(4)
    text = "".join(ima.format_line(e) + "\n" for e in log)
    pcrs = _pcrs(p10=ima.replay(log, BANK))
    v = _verify(pcrs, ima=ImaChecker(_policy(log)), evidence_kw={"ima_list": text})
    assert v.valid and v.pcr10 == ev.PCR10_CHECKED and v.next_entry == 4
    # one file the policy does not know
    v = _verify(pcrs, ima=ImaChecker(_policy(log[:3])), evidence_kw={"ima_list": text})
    assert not v.valid and all(i.startswith("ima.") for i in _ids(v)), v.failures


def test_measured_boot_check():
    boot = FakeBoot()
    v = _verify(measured_boot=boot, evaluate_boot_policy=False, evidence_kw={"mb_log": b"log"})
    assert v.valid and boot.calls == [(b"log", [0, 1, 2, 10, 16], BANK, False)]
    boot = FakeBoot()
    _verify(measured_boot=boot)
    assert boot.calls == [(b"", [0, 1, 2, 10, 16], BANK, True)]  # no log sent: the check says so
    boot = FakeBoot()
    assert not _verify(measured_boot=boot, nonce="x" * 20).valid and boot.calls == []
    bad = Failure("measured_boot.test", {}, Severity.CRITICAL)
    assert _ids(_verify(measured_boot=FakeBoot([bad]))) == ["measured_boot.test"]


def test_refstate_check():
    assert RefStateCheck.from_text(None) is None and RefStateCheck.from_text("{}") is None
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "mb_refstate_upstream_good.json").read_text()
    check = RefStateCheck.from_text(text)
    assert check is not None
    assert _ids(_verify(measured_boot=check)) == ["measured_boot.missing_log"]


@pytest.mark.parametrize("field", ["ak", "nonce", "tpm_policy", "ima"])
def test_expectations_are_frozen(field):
    with pytest.raises(AttributeError):
        setattr(_expect(), field, None)
