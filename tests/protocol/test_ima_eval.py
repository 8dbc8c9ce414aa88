"""IMA evaluation: policy verdicts with upstream event ids, PCR 10 replay, incrementality."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import ima, ima_sig
from keytrio.protocol import ima_eval as ev
from keytrio.protocol import ima_rules as rules
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.ima import Entry
from keytrio.protocol.ima_eval import ImaChecker, ImaProgress, evaluate_ima
from keytrio.protocol.runtime_policy import ImaKey, RuntimePolicy, parse_policy, policy_document

DATA = Path(__file__).parent / "data" / "keylime"
BANK = "sha256"
PCRS0 = {i: bytes(32) for i in range(10)}


def _d(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _file(path: str, content: bytes | None = None) -> Entry:
    return ima.build_entry("ima-ng", path, "sha256", _d(content if content is not None else path.encode()))


def _text(entries: list[Entry]) -> str:
    return "".join(ima.format_line(e) + "\n" for e in entries)


def _policy(entries: list[Entry], **over: Any) -> RuntimePolicy:
    digests: dict[str, list[str]] = {}
    for e in entries:
        if e.template in ("ima-ng", "ima-sig", "ima") and not e.is_violation:
            digests.setdefault(e.path, []).append(e.digest.hex())
    return parse_policy(json.dumps(policy_document(digests=digests, **over)))


def _log(n: int = 5) -> list[Entry]:
    return [ima.boot_aggregate_entry(BANK, PCRS0)] + [_file(f"/usr/bin/f{i}") for i in range(n)]


def _eval(
    entries: list[Entry], policy: RuntimePolicy | None, quote: list[Entry] | None = None, **kw: Any
) -> ev.ImaResult:
    pcr = ima.replay(entries if quote is None else quote, BANK)
    return evaluate_ima(_text(entries), 0, pcr, BANK, policy, ImaProgress(), **kw)


def _ids(fails: list[Any]) -> list[str]:
    return [f.event_id for f in fails]


# --- verdicts ----------------------------------------------------------------------------------


def test_in_policy_log_passes() -> None:
    log = _log()
    r = _eval(log, _policy(log))
    assert r.ok and not r.warnings
    assert r.progress.count == len(log) == r.lines_parsed
    assert r.progress.pcrs == {BANK: ima.replay(log, BANK).hex()}


def test_file_outside_policy() -> None:
    log = _log()
    pol = _policy(log)
    log.append(_file("/usr/bin/evil"))
    r = _eval(log, pol)
    assert _ids(r.failures) == [rules.NOT_IN_ALLOWLIST] == ["ima.validation.ima-ng.not_in_allowlist"]
    ctx = r.failures[0].context
    assert ctx["path"] == "/usr/bin/evil" and ctx["line"] == len(log) - 1
    assert r.progress.count == 0  # not advanced after a failure: next poll re-reads these lines


def test_wrong_digest() -> None:
    log = _log()
    pol = _policy(log)
    log[3] = _file(log[3].path, b"tampered")
    r = _eval(log, pol)
    assert _ids(r.failures) == ["ima.validation.ima-ng.runtime_policy_hash"]
    assert r.failures[0].context["path"] == log[3].path and r.failures[0].context["line"] == 3
    assert r.failures[0].context["got"] == log[3].digest.hex()


def test_tampered_template_hash() -> None:
    log = _log()
    pol = _policy(log)
    e = log[2]
    log[2] = Entry(e.pcr, bytes(20 - 1) + b"\x01", e.template, e.digest_alg, e.digest, e.path)
    # the quote is what the kernel really extended (the correct entry)
    r = evaluate_ima(_text(log), 0, ima.replay(_log(), BANK), BANK, pol, ImaProgress())
    assert _ids(r.failures) == ["ima.validation.ima_hash"]
    assert r.failures[0].context["line"] == 2 and r.failures[0].context["path"] == e.path


def test_excluded_path_passes() -> None:
    log = _log()
    pol = _policy(log, excludes=["/tmp/", r"/var/cache/.*\.bin"])
    log += [_file("/tmp/build/x"), _file("/var/cache/a.bin")]
    assert _eval(log, pol).ok
    log.append(_file("/var/cache/a.txt"))
    assert _ids(_eval(log, pol).failures) == [rules.NOT_IN_ALLOWLIST]


def test_tomtou_fails_by_default_and_is_a_warning_when_ignored() -> None:
    log = _log()
    pol = _policy(log)
    log.append(ima.violation_entry("/var/log/messages"))
    r = _eval(log, pol)
    assert _ids(r.failures) == ["ima.validation.tomtou"] and r.failures[0].context["line"] == len(log) - 1
    r = _eval(log, pol, ignore_tomtou_errors=True)
    assert r.ok and _ids(r.warnings) == ["ima.validation.tomtou"]
    assert r.progress.count == len(log)


def test_entry_not_for_pcr_10() -> None:
    log = _log()
    log.append(ima.build_entry("ima-ng", "/usr/bin/other", "sha256", _d(b"o"), pcr=11))
    r = _eval(log, _policy(log))
    assert _ids(r.failures) == ["ima.validation.ima_pcr"]


def test_unparsable_line() -> None:
    log = _log()
    text = _text(log) + "10 zz ima-ng sha256:00 /x\n"
    r = evaluate_ima(text, 0, ima.replay([*log, _file("/x")], BANK), BANK, _policy(log), ImaProgress())
    assert _ids(r.failures) == ["ima.parser.entry", "ima.pcr_mismatch"]
    assert r.failures[0].context["line"] == len(log)


def test_no_policy_still_checks_hashes_and_replay() -> None:
    log = [*_log(), _file("/anything")]
    assert _eval(log, None).ok
    bad = list(log)
    e = bad[1]
    bad[1] = Entry(e.pcr, b"\x01" * 20, e.template, e.digest_alg, e.digest, e.path)
    assert _ids(_eval(bad, None, quote=log).failures) == ["ima.validation.ima_hash"]
    assert _ids(_eval(log, None, quote=[*log[:-1], _file("/other")]).failures) == ["ima.pcr_mismatch"]


def test_log_hash_alg_sha256() -> None:
    log = [ima.build_entry("ima-ng", "/a", "sha256", _d(b"a"), template_hash_alg="sha256")]
    pol = _policy(log, ima={"log_hash_alg": "sha256"})
    assert _eval(log, pol).ok
    assert _ids(_eval(log, _policy(log)).failures) == ["ima.validation.ima_hash"]  # sha1 expected


def test_sha1_bank_and_legacy_template() -> None:
    log = [
        ima.boot_aggregate_entry("sha1", {i: bytes(20) for i in range(8)}, template="ima"),
        ima.build_entry("ima", "/bin/legacy", "sha1", hashlib.sha1(b"l").digest()),
    ]
    pol = _policy(log)
    r = evaluate_ima(_text(log), 0, ima.replay(log, "sha1"), "sha1", pol, ImaProgress())
    assert r.ok and r.progress.pcrs == {"sha1": ima.replay(log, "sha1").hex()}


def test_boot_aggregate_against_quoted_pcrs() -> None:
    log = _log()
    pol = _policy(log[1:])  # the policy does not list boot_aggregate
    pcr10 = ima.replay(log, BANK)
    good = {**PCRS0, 10: pcr10}
    assert evaluate_ima(_text(log), 0, pcr10, BANK, pol, ImaProgress(), quoted_pcrs=good).ok
    assert evaluate_ima(_text(log), 0, pcr10, BANK, pol, ImaProgress()).ok  # nothing to compare
    bad = {**PCRS0, 0: b"\x01" * 32, 10: pcr10}
    r = evaluate_ima(_text(log), 0, pcr10, BANK, pol, ImaProgress(), quoted_pcrs=bad)
    assert _ids(r.failures) == [rules.RUNTIME_POLICY_HASH] and r.failures[0].context["path"] == "boot_aggregate"


# --- replay against the quote ------------------------------------------------------------------


def test_log_ahead_of_quote_then_next_poll_continues() -> None:
    log = _log(8)
    pol = _policy(log)
    r = evaluate_ima(_text(log), 0, ima.replay(log[:6], BANK), BANK, pol, ImaProgress())
    assert r.ok and r.progress.count == 6 and r.lines_parsed == 6 and r.progress.lag == 3
    r2 = evaluate_ima(_text(log[6:]), 6, ima.replay(log, BANK), BANK, pol, r.progress)
    assert r2.ok and r2.progress.count == len(log) and r2.lines_parsed == 3
    # lines after the matching one are not judged in this poll ...
    bad = [*log[:6], _file("/usr/bin/evil")]
    r = evaluate_ima(_text(bad), 0, ima.replay(log[:6], BANK), BANK, pol, ImaProgress())
    assert r.ok and r.progress.count == 6
    # ... but are in the next one
    r = evaluate_ima(_text(bad[6:]), 6, ima.replay(bad, BANK), BANK, pol, r.progress)
    assert _ids(r.failures) == [rules.NOT_IN_ALLOWLIST] and r.failures[0].context["line"] == 6


def test_check_unquoted_judges_lines_after_the_match() -> None:
    # /verify/evidence: every presented line is judged, the quote covers them or not
    log = _log(8)
    pol = _policy(log)
    quoted = ima.replay(log[:6], BANK)
    bad = [*log[:6], _file("/usr/bin/evil"), _file("/usr/bin/f1", b"tampered"), *log[6:]]
    r = evaluate_ima(_text(bad), 0, quoted, BANK, pol, ImaProgress(), check_unquoted=True)
    assert _ids(r.failures) == [rules.NOT_IN_ALLOWLIST, rules.RUNTIME_POLICY_HASH]
    assert [f.context["line"] for f in r.failures] == [6, 7]
    # an unreadable line after the match is a parser failure and the lines after it are still read
    text = _text(log[:6]) + "10 garbage\n" + _text([_file("/usr/bin/evil")])
    r = evaluate_ima(text, 0, quoted, BANK, pol, ImaProgress(), check_unquoted=True)
    assert _ids(r.failures) == [ev.PARSER_ENTRY, rules.NOT_IN_ALLOWLIST]
    # a clean tail passes, and the progress still stops at the quoted position
    r = evaluate_ima(_text(log), 0, quoted, BANK, pol, ImaProgress(), check_unquoted=True)
    assert r.ok and r.progress.count == 6 and r.lines_parsed == len(log)
    # the quote matching before the first line (PCR 10 still zero): the whole list is judged
    r = evaluate_ima(_text(bad), 0, bytes(32), BANK, pol, ImaProgress(), check_unquoted=True)
    assert _ids(r.failures) == [rules.NOT_IN_ALLOWLIST, rules.RUNTIME_POLICY_HASH]


def test_quote_must_catch_up_with_its_lag() -> None:
    log = _log(8)
    pol = _policy(log)
    r = evaluate_ima(_text(log), 0, ima.replay(log[:4], BANK), BANK, pol, ImaProgress())
    assert r.ok and r.progress.lag == 5
    # the next quote covers only 1 of the 5 lines that were already in the log
    r2 = evaluate_ima(_text(log[4:]), 4, ima.replay(log[:5], BANK), BANK, pol, r.progress)
    assert _ids(r2.failures) == ["ima.quote_progress"]


def test_log_behind_quote_fails() -> None:
    log = _log()
    pol = _policy(log)
    r = evaluate_ima(_text(log[:-1]), 0, ima.replay(log, BANK), BANK, pol, ImaProgress())
    assert _ids(r.failures) == ["ima.pcr_mismatch"] and r.progress.count == 0


def test_no_new_lines() -> None:
    log = _log()
    pol = _policy(log)
    r = _eval(log, pol)
    for text in (None, ""):
        r2 = evaluate_ima(text, len(log), ima.replay(log, BANK), BANK, pol, r.progress)
        assert r2.ok and r2.progress.count == len(log) and r2.lines_parsed == 0
    r3 = evaluate_ima(None, len(log), ima.replay([*log, _file("/x")], BANK), BANK, pol, r.progress)
    assert _ids(r3.failures) == ["ima.pcr_mismatch"]


def test_wrong_first_entry_and_restart_at_zero() -> None:
    log = _log()
    pol = _policy(log)
    r = _eval(log, pol)
    bad = evaluate_ima(_text(log[2:]), 2, ima.replay(log, BANK), BANK, pol, r.progress)
    assert _ids(bad.failures) == ["qoute_validation.invalid_ima_entry_nb"]
    assert bad.failures[0].context == {**bad.failures[0].context, "got": 2, "expected": len(log)}
    # an agent that sends the whole list again (from 0) is re-evaluated from scratch
    again = evaluate_ima(_text(log), 0, ima.replay(log, BANK), BANK, pol, r.progress)
    assert again.ok and again.progress.count == len(log) and again.lines_parsed == len(log)


def test_bank_without_running_value() -> None:
    log = _log()
    r = _eval(log, None)
    sha1 = evaluate_ima(None, len(log), ima.replay(log, "sha1"), "sha1", None, r.progress)
    assert _ids(sha1.failures) == ["ima.pcr_mismatch"]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6))
def test_chunked_equals_one_shot(cuts: list[int]) -> None:
    log = _log(40)
    pol = _policy(log)
    bounds = sorted({min(c, len(log)) for c in cuts} | {len(log)})
    progress = ImaProgress()
    start = 0
    for b in bounds:
        r = evaluate_ima(_text(log[start:b]), start, ima.replay(log[:b], BANK), BANK, pol, progress)
        assert r.ok and r.lines_parsed == b - start
        progress, start = r.progress, b
    one = evaluate_ima(_text(log), 0, ima.replay(log, BANK), BANK, pol, ImaProgress())
    assert progress == one.progress


def test_five_chunks_same_verdict_as_one_call() -> None:
    log = _log(49)  # 50 lines
    pol = _policy(log[:30])  # lines 30.. are outside the policy
    one = _eval(log, pol)
    assert one.failures and one.failures[0].context["line"] == 30
    progress, fails, start, polls = ImaProgress(), [], 0, 0
    for _ in range(5):
        polls += 1
        chunk = log[start : start + 10]
        r = evaluate_ima(_text(chunk), start, ima.replay(log[: start + 10], BANK), BANK, pol, progress)
        assert r.lines_parsed == len(chunk) == 10
        fails += r.failures
        if r.failures:
            break
        progress, start = r.progress, r.progress.count
    assert polls == 4 and _ids(fails) == _ids(one.failures)[:10]
    assert {f.context["line"] for f in fails} == set(range(30, 40))
    good = _policy(log)
    progress, start = ImaProgress(), 0
    for _ in range(5):
        r = evaluate_ima(
            _text(log[start : start + 10]), start, ima.replay(log[: start + 10], BANK), BANK, good, progress
        )
        assert r.ok and r.lines_parsed == 10
        progress, start = r.progress, r.progress.count
    assert progress == _eval(log, good).progress


def test_progress_json_round_trip_and_boot() -> None:
    cert = (DATA / "ima_cert.der").read_bytes()
    log = [
        ima.boot_aggregate_entry(BANK, PCRS0),
        ima.build_entry("ima-buf", ".ima", "sha256", _d(cert), buf=cert),
    ]
    r = _eval(log, _policy(log, keyrings={".ima": [_d(cert).hex()]}))
    assert r.ok and len(r.progress.learned_keys) == 1
    p = ImaProgress(**{**r.progress.__dict__, "boottime": 100, "reset_count": 2})
    back = ImaProgress.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p
    assert p.for_boot(100, 2) == p and p.for_boot(None, None) == p
    assert p.for_boot(101, 2) == ImaProgress(boottime=101, reset_count=2)
    assert p.for_boot(100, 3).count == 0
    with pytest.raises(ValidationError):
        ImaProgress.from_json({"count": -1, "pcrs": {}})
    with pytest.raises(ValidationError):
        ImaProgress.from_json({"count": 1, "pcrs": {"sha256": "00"}})


def test_fifty_thousand_lines() -> None:
    log = [ima.boot_aggregate_entry(BANK, PCRS0)] + [_file(f"/usr/lib/x/{i}.so") for i in range(50_000)]
    pol = _policy(log, excludes=["/tmp/.*", "/proc/"])
    text = _text(log)
    pcr = ima.replay(log, BANK)
    t0 = time.perf_counter()
    r = evaluate_ima(text, 0, pcr, BANK, pol, ImaProgress())
    elapsed = time.perf_counter() - t0
    print(f"\n50,001-line first attestation: {elapsed:.3f} s")  # informational, not asserted
    assert r.ok and r.progress.count == len(log) == r.lines_parsed
    more = [_file("/usr/bin/late")]
    r2 = evaluate_ima(
        _text(more), len(log), ima.replay(more, BANK, pcr), BANK, _policy(log + more), r.progress
    )
    assert r2.ok and r2.lines_parsed == 1


# --- ima-sig -----------------------------------------------------------------------------------


RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEY = ec.derive_private_key(0xABCDEF, ec.SECP256R1())


def _signed(path: str, key: Any, content: bytes = b"signed", *, tamper: bool = False) -> Entry:
    digest = _d(content)
    ik = ImaKey.of(key.public_key())
    pre = Prehashed(hashes.SHA256())
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(digest, padding.PKCS1v15(), pre)
    else:
        raw = key.sign(digest, ec.ECDSA(pre))
    if tamper:
        raw = raw[:-1] + bytes([raw[-1] ^ 1])
    sig = ima_sig.ima_signature(digest, "sha256", ik.keyid, raw)
    return ima.build_entry("ima-sig", path, "sha256", digest, signature=sig)


def _pub_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("key", [EC_KEY, RSA_KEY], ids=["ecdsa", "rsa"])
def test_ima_sig_valid_invalid_missing(key: Any) -> None:
    base = _log(1)
    pol = _policy(base)  # the signed files are not in digests: only signatures can admit them
    extra = [_pub_pem(key)]
    valid = [*base, _signed("/usr/bin/s", key)]
    assert _eval(valid, pol, extra_verification_keys=extra).ok
    # without the key the signature cannot be checked and the file is not in the policy
    r = _eval(valid, pol)
    assert _ids(r.failures) == [rules.NOT_IN_ALLOWLIST] and r.failures[0].context["signature"].startswith(
        "no key"
    )
    invalid = [*base, _signed("/usr/bin/s", key, tamper=True)]
    r = _eval(invalid, pol, extra_verification_keys=extra)
    assert (
        _ids(r.failures) == [rules.NOT_IN_ALLOWLIST]
        and r.failures[0].context["signature"] == "invalid signature"
    )
    missing = [*base, ima.build_entry("ima-sig", "/usr/bin/s", "sha256", _d(b"signed"))]
    r = _eval(missing, pol, extra_verification_keys=extra)
    assert (
        _ids(r.failures) == [rules.NOT_IN_ALLOWLIST]
        and r.failures[0].context["signature"] == "missing signature"
    )
    # upstream: an unverified signature falls back to the digest list
    assert _eval(missing, _policy(missing), extra_verification_keys=extra).ok
    # without a policy but with keys: upstream's invalid_signature
    r = _eval(invalid, None, extra_verification_keys=extra)
    assert _ids(r.failures) == ["ima.validator.ima-sig.invalid_signature"]
    assert r.failures[0].context["path"] == "/usr/bin/s"
    assert _eval(valid, None, extra_verification_keys=extra).ok


def test_ima_sig_key_from_policy_verification_keys() -> None:
    ik = ImaKey.of(EC_KEY.public_key())
    import base64

    vk = json.dumps({"pubkeys": [base64.b64encode(ik.der).decode()], "keyids": [ik.keyid]})
    log = [*_log(1), _signed("/usr/bin/s", EC_KEY)]
    assert _eval(log, _policy(_log(1), **{"verification-keys": vk})).ok


def test_ima_sig_wrong_hash_algorithm_in_header() -> None:
    digest = _d(b"x")
    raw = EC_KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    sig = ima_sig.ima_signature(hashlib.sha1(b"x").digest(), "sha1", ImaKey.of(EC_KEY.public_key()).keyid, raw)
    log = [*_log(1), ima.build_entry("ima-sig", "/s", "sha256", digest, signature=sig)]
    r = _eval(log, _policy(_log(1)), extra_verification_keys=[_pub_pem(EC_KEY)])
    assert r.failures and "hash algorithm" in r.failures[0].context["signature"]


# --- ima-buf -----------------------------------------------------------------------------------


def _cert(key: ec.EllipticCurvePrivateKey) -> bytes:
    import datetime

    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ima")])
    t = datetime.datetime(2024, 1, 1)
    c = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(t).not_valid_after(t + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return c.public_bytes(serialization.Encoding.DER)


def test_ima_buf_keyring_allowed_denied_and_learned() -> None:
    cert = _cert(EC_KEY)
    key_entry = ima.build_entry("ima-buf", ".ima", "sha256", _d(cert), buf=cert)
    signed = _signed("/usr/bin/s", EC_KEY)
    log = [*_log(1), key_entry, signed]
    allowed = _policy(_log(1), keyrings={".ima": [_d(cert).hex()]})
    assert _eval(log, allowed).ok  # key admitted by the policy, then used for the signature
    denied = _policy(_log(1), keyrings={".ima": ["00" * 32]})
    r = _eval(log, denied)
    assert _ids(r.failures) == [rules.RUNTIME_POLICY_HASH, rules.NOT_IN_ALLOWLIST]
    assert r.failures[0].context["path"] == ".ima" and r.failures[1].context["path"] == "/usr/bin/s"
    r = _eval(log, _policy(_log(1)))
    assert _ids(r.failures)[0] == rules.NOT_IN_ALLOWLIST and r.failures[0].context["path"] == ".ima"
    # an ignored keyring is neither checked nor trusted
    ignored = _policy(_log(1), ima={"ignored_keyrings": [".ima"]})
    assert _ids(_eval(log, ignored).failures) == [rules.NOT_IN_ALLOWLIST]
    assert _eval(log[:-1], ignored).ok
    # the learned key carries over to the next poll
    r1 = _eval(log[:-1], allowed)
    r2 = evaluate_ima(_text(log[-1:]), len(log) - 1, ima.replay(log, BANK), BANK, allowed, r1.progress)
    assert r2.ok


def test_ima_buf_measured_buffers() -> None:
    buf = ima.build_entry("ima-buf", "device_resume", "sha256", _d(b"name=TEST;"), buf=b"name=TEST;")
    log = [*_log(1), buf]
    assert _eval(log, _policy(_log(1), **{"ima-buf": {"device_resume": [_d(b"name=TEST;").hex()]}})).ok
    r = _eval(log, _policy(_log(1), **{"ima-buf": {"device_resume": ["11" * 32]}}))
    assert _ids(r.failures) == [rules.RUNTIME_POLICY_HASH]
    assert _ids(_eval(log, _policy(_log(1))).failures) == [rules.NOT_IN_ALLOWLIST]


def test_ima_buf_unsupported_key_type() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    der = (
        ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32))
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    log = [*_log(1), ima.build_entry("ima-buf", ".ima", "sha256", _d(der), buf=der)]
    assert _ids(_eval(log, _policy(_log(1))).failures) == ["ima.invalid_key"]


# --- upstream vectors and the hook adapter -----------------------------------------------------


def test_upstream_policy_against_its_source_list() -> None:
    text = (DATA / "ima_list.txt").read_text()
    pol = parse_policy((DATA / "policy_ima.json").read_bytes())
    entries = ima.parse_list(text)
    r = evaluate_ima(text, 0, ima.replay(entries, BANK), BANK, pol, ImaProgress())
    assert r.ok and r.progress.count == len(entries) and len(r.progress.learned_keys) == 1


def test_checker_adapter() -> None:
    log = _log(6)
    pol = _policy(log)
    check = ImaChecker(pol)
    fails, nxt = check(_text(log[:4]), 0, {10: ima.replay(log[:4], BANK)}, BANK)
    assert fails == [] and nxt == 4 and check.last is not None and check.last.lines_parsed == 4
    fails, nxt = check(_text(log[4:]), 4, {10: ima.replay(log, BANK)}, BANK)
    assert fails == [] and nxt == len(log)
    fails, nxt = check(None, nxt, {}, BANK)
    assert _ids(fails) == ["ima.pcr_mismatch"] and nxt == len(log)
    warn = ImaChecker(None, ignore_tomtou_errors=True)
    v = [*_log(1), ima.violation_entry("/x")]
    fails, nxt = warn(_text(v), 0, {10: ima.replay(v, BANK)}, BANK)
    assert [f.severity.label for f in fails] == ["warning"] and nxt == len(v)
