"""protocol.pcr_blob: the tpm2-tools PCR blob (push ``subject_data``), decode and encode."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import pcr_blob, quote, tpm2
from keytrio.protocol.errors import DecodeError, ValidationError
from tests.protocol.quote_support import pcr_values

BANKS = ["sha1", "sha256", "sha384", "sha512"]


@st.composite
def banks(draw):
    chosen = draw(st.lists(st.sampled_from(BANKS), unique=True, max_size=4))
    out = {}
    for bank in chosen:
        size = tpm2.DIGEST_SIZES[bank]
        out[bank] = {p: draw(st.binary(min_size=size, max_size=size)) for p in draw(st.sets(st.integers(0, 23)))}
    return out


@settings(max_examples=150, deadline=None)
@given(banks())
def test_round_trip_any_banks(b):
    blob = pcr_blob.encode(b)
    total = sum(len(p) for p in b.values())
    assert len(blob) == 136 + 532 * ((total + 7) // 8)
    assert pcr_blob.decode(blob) == b


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(BANKS), st.sets(st.integers(0, 23), min_size=1))
def test_single_bank_is_what_tpm2_quote_writes(bank, pcrs):
    values = pcr_values(bank, sorted(pcrs))
    ours = pcr_blob.encode({bank: values})
    assert ours == quote.encode_pcr_blob(bank, values)  # the codec the pull quotes use
    assert pcr_blob.decode_single(ours) == (bank, values) == quote.decode_pcr_blob(ours)


def test_layout_by_hand_two_banks():
    b = {"sha1": pcr_values("sha1", [0, 10]), "sha256": pcr_values("sha256", [10])}
    blob = pcr_blob.encode(b)
    assert blob[:4] == b"\x02\x00\x00\x00"
    assert blob[4:12] == bytes.fromhex("0400" "03" "01040000" "00")  # sha1, 3 bytes, PCR 0+10, pad
    assert blob[12:20] == bytes.fromhex("0b00" "03" "00040000" "00")  # sha256, PCR 10
    assert blob[132:140] == bytes.fromhex("01000000" "03000000")  # one list of 3 digests
    assert blob[140:142] == b"\x14\x00" and blob[142:162] == b["sha1"][0]


def test_values_split_over_short_lists_decode():
    """A TPM answering fewer than 8 values per read: tpm2-tools writes shorter lists."""
    values = pcr_values("sha256", list(range(10)))
    head = bytearray(pcr_blob.encode({"sha256": values})[: pcr_blob.SELECTION_SIZE])
    lists = b""
    for chunk in ([0, 1, 2], [3, 4, 5, 6, 7, 8, 9]):
        body = b"".join(struct.pack("<H", 32) + values[p] + bytes(32) for p in chunk)
        lists += struct.pack("<I", len(chunk)) + body + bytes(66 * (8 - len(chunk)))
    blob = bytes(head) + struct.pack("<I", 2) + lists
    assert pcr_blob.decode(blob) == {"sha256": values}


@pytest.mark.parametrize("cut", [0, 10, 135, 136, 300, 667])
def test_truncated_is_a_decode_error(cut):
    blob = pcr_blob.encode({"sha256": pcr_values("sha256", [0, 1, 10])})
    with pytest.raises(DecodeError):
        pcr_blob.decode(blob[:cut])


def test_malformed_blobs():
    good = bytearray(pcr_blob.encode({"sha256": pcr_values("sha256", [0, 1, 10])}))
    for patch in (
        (0, struct.pack("<I", 17)),  # too many selections
        (4, struct.pack("<H", 0x0099)),  # unknown bank
        (6, b"\x05"),  # sizeofSelect > 4
        (136, struct.pack("<I", 9)),  # digest count > 8
        (140, struct.pack("<H", 20)),  # sha1-sized value in the sha256 bank
        (140, struct.pack("<H", 65)),  # larger than a digest slot
        (136, struct.pack("<I", 2)),  # fewer values than selected PCRs
    ):
        bad = bytearray(good)
        bad[patch[0] : patch[0] + len(patch[1])] = patch[1]
        with pytest.raises(DecodeError):
            pcr_blob.decode(bytes(bad))
    twice = pcr_blob.encode({"sha256": {}, "sha1": {}})
    twice = twice[:12] + twice[4:12] + twice[20:]
    twice = struct.pack("<I", 2) + twice[4:]
    with pytest.raises(DecodeError):
        pcr_blob.decode(twice)
    with pytest.raises(DecodeError):
        pcr_blob.decode_single(pcr_blob.encode({"sha1": {}, "sha256": {}}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_any_bytes_decode_or_raise_decode_error(raw):
    try:
        pcr_blob.decode(raw)
    except DecodeError:
        pass


def test_encode_refuses_bad_input():
    with pytest.raises(ValidationError):
        pcr_blob.encode({"md5": {}})
    with pytest.raises(ValidationError):
        pcr_blob.encode({"sha256": {24: bytes(32)}})
    with pytest.raises(ValidationError):
        pcr_blob.encode({"sha256": {1: bytes(20)}})
