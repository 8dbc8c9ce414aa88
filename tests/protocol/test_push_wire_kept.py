"""What push_wire keeps instead of computing again, against the general path.

- ``parse_evidence`` keeps the PCR blob's decode (``Evidence.blob_pcrs``) for ``parsed_quote``:
  on good blobs of each bank, blobs of two banks, and every byte of a blob replaced, the refusal
  (status and detail) is the one the full decode gave before, and ``parsed_quote`` with the kept
  decode equals ``parsed_quote`` decoding the blob itself.
- ``timestamp`` (isoformat, memo) equals ``timestamp_general`` (strftime, the first version) on
  epochs of every kind: now, fractions at the microsecond's rounding, years below 1000, the
  limits, ints, and the memo refilled after it was cleared.
"""

from __future__ import annotations

import base64
import dataclasses
import random

import pytest

from keytrio.protocol import pcr_blob, push_wire, quote
from keytrio.protocol.push_wire import WireError
from tests.protocol.quote_support import make_attest, pcr_values, sign_attest

NONCE = b"abcdefghij0123456789"


def _requested(bank: str = "sha256") -> list[dict]:
    req = push_wire.Requested("Y2hhbGxlbmdl", bank, "rsassa", [0, 10], {"ima_log": 3}, {"key_class": "asymmetric"})
    return push_wire.evidence_requested(req)


def _doc(subject: object, message: bytes = b"\x00\x01\x02", signature: bytes = b"\x03\x04\x05") -> dict:
    return {"data": {"type": "attestation", "attributes": {"evidence_collected": [
        {"evidence_class": "certification", "evidence_type": "tpm_quote", "data": {
            "subject_data": subject, "message": base64.b64encode(message).decode(),
            "signature": base64.b64encode(signature).decode()}},
        {"evidence_class": "log", "evidence_type": "ima_log", "data": {"entry_count": 0, "entries": ""}},
    ]}}}


def _general_refusal(blob: bytes) -> tuple[int, str] | None:
    """What parse_evidence answered for a base64 blob before the decode was kept."""
    try:
        pcr_blob.decode(blob)
    except push_wire.ProtocolError as exc:
        return 422, f"tpm_quote.data.subject_data: {exc}"
    return None


def _outcome(blob: bytes, bank: str = "sha256", message: bytes = b"\x00", signature: bytes = b"\x00"):
    try:
        ev = push_wire.parse_evidence(_doc(base64.b64encode(blob).decode(), message, signature), _requested(bank), bank)
    except WireError as exc:
        return (exc.status, exc.detail), None
    return None, ev


def _good(bank: str = "sha256", kind: str = "rsa") -> tuple[bytes, bytes, bytes]:
    pcrs = pcr_values(bank, [0, 1, 2, 7, 10])
    attest = make_attest(bank=bank, pcrs=pcrs, nonce=NONCE)
    return attest, sign_attest(attest, kind, bank), quote.encode_pcr_blob(bank, pcrs)


def _same_quote(ev: push_wire.Evidence) -> None:
    general = dataclasses.replace(ev, blob_pcrs=None)
    assert general == ev  # the kept decode is no part of the evidence's identity
    assert push_wire.parsed_quote(ev) == push_wire.parsed_quote(general)


@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384"])
def test_good_blob_kept_and_parsed_the_same(bank: str) -> None:
    attest, sig, blob = _good(bank, "rsa")
    refusal, ev = _outcome(blob, bank, attest, sig)
    assert refusal is None and ev is not None
    assert ev.blob_pcrs == pcr_blob.decode_single(blob)
    parsed = push_wire.parsed_quote(ev)
    assert parsed is not None and parsed == quote.parse_quote(push_wire.quote_text(ev))
    _same_quote(ev)
    parsed.pcrs[0] = b"changed"  # the ParsedQuote's dict is its own: the kept decode is untouched
    assert ev.blob_pcrs == pcr_blob.decode_single(blob)
    assert push_wire.parsed_quote(ev) == push_wire.parsed_quote(dataclasses.replace(ev, blob_pcrs=None))


def test_two_banks_accepted_as_before_and_not_kept() -> None:
    blob = pcr_blob.encode({"sha1": {0: bytes(20)}, "sha256": {0: bytes(32), 10: b"\x11" * 32}})
    assert _general_refusal(blob) is None
    refusal, ev = _outcome(blob)
    assert refusal is None and ev is not None and ev.blob_pcrs is None
    assert push_wire.parsed_quote(ev) is None  # one bank only: the check gets the text, as before


def test_object_form_not_kept_and_parsed_the_same() -> None:
    ev = push_wire.parse_evidence(_doc({"0": "00" * 32, "10": "11" * 32}), _requested(), "sha256")
    assert ev.blob_pcrs is None
    _same_quote(ev)


def _mutations(raw: bytes) -> list[bytes]:
    """Not the empty blob: base64 "" is refused by _b64 (400) before any decode."""
    out = [raw[:1], raw[:-1], raw[: len(raw) // 2], raw + b"\x00", raw + raw]
    for i in range(len(raw)):
        for b in (0x00, 0x01, 0xFF, raw[i] ^ 0x01, raw[i] ^ 0x80):
            out.append(raw[:i] + bytes([b]) + raw[i + 1:])
    return out


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_every_byte_of_the_blob_refused_or_parsed_as_before(bank: str) -> None:
    attest, sig, blob = _good(bank)
    seen = {"refused": 0, "kept": 0, "not kept": 0}
    two = pcr_blob.encode({"sha1": {0: bytes(20)}, "sha256": {0: bytes(32)}})
    for mutated in [*_mutations(blob), two, *_mutations(two)[::7]]:
        refusal, ev = _outcome(mutated, bank, attest, sig)
        assert refusal == _general_refusal(mutated), mutated.hex()
        if ev is None:
            seen["refused"] += 1
            continue
        single = None
        try:
            single = pcr_blob.decode_single(mutated)
        except push_wire.ProtocolError:
            pass
        assert ev.blob_pcrs == single
        seen["kept" if single is not None else "not kept"] += 1
        _same_quote(ev)
    assert all(seen.values()), seen  # every outcome reached


# --- timestamp -------------------------------------------------------------------------------------


def _epochs() -> list[float | int | None]:
    rng = random.Random(7)
    out: list[float | int | None] = [None, 0, 0.0, -0.0, 1, 1.5, 1764806400, 1764806400.123456, 1764806400.9999995,
                                     1764806400.0000005, 1764806399.9999999, 253402300799.999999, 253402300799,
                                     -1, -0.5, -30610224000.0, -30610224000.5, -30610224001.0, -62135596800.0,
                                     -50000000000.25, 1e9 + 0.1234565, 2 ** 31, 2 ** 31 + 0.5]
    out += [rng.uniform(0, 4e9) for _ in range(2000)]
    out += [rng.uniform(-62135596800, 253402300799) for _ in range(2000)]
    out += [int(rng.uniform(0, 4e9)) + rng.randrange(1_000_000) / 1e6 for _ in range(1000)]
    return out


def _general_or_error(epoch):
    try:
        return push_wire.timestamp_general(epoch)
    except (ValueError, OverflowError, OSError) as exc:
        return type(exc)


def _fast_or_error(epoch):
    try:
        return push_wire.timestamp(epoch)
    except (ValueError, OverflowError, OSError) as exc:
        return type(exc)


def test_timestamp_equals_the_general_rendering() -> None:
    push_wire._STAMPS.clear()
    epochs = _epochs()
    for epoch in epochs:
        assert _fast_or_error(epoch) == _general_or_error(epoch), epoch
    for epoch in epochs:  # again, from the memo
        assert _fast_or_error(epoch) == _general_or_error(epoch), epoch
    assert any(e is not None and e < -30610224000 for e in epochs)  # years below 1000 were rendered


@pytest.mark.parametrize("epoch", [float("nan"), float("inf"), -float("inf"), 1e20, -1e20])
def test_timestamp_refuses_as_the_general_rendering(epoch: float) -> None:
    assert _fast_or_error(epoch) == _general_or_error(epoch)
    assert isinstance(_fast_or_error(epoch), type)


def test_timestamp_memo_is_bounded_and_stays_right() -> None:
    push_wire._STAMPS.clear()
    base = 1764806400.0
    for i in range(push_wire._MAX_STAMPS * 2 + 3):
        epoch = base + i * 0.001
        assert push_wire.timestamp(epoch) == push_wire.timestamp_general(epoch)
        assert len(push_wire._STAMPS) <= push_wire._MAX_STAMPS
    assert push_wire.timestamp(base) == push_wire.timestamp_general(base)

