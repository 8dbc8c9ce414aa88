"""protocol.quote: pcr blob layout, TPMS_ATTEST / TPMT_SIGNATURE decoding, the quote string."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss.constants import TPM2_GENERATED, TPM2_ST
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPMS_ATTEST,
    TPMT_SIGNATURE,
)

from keytrio.protocol import quote, tpm2
from keytrio.protocol.errors import DecodeError, ProtocolError, ValidationError
from tests.protocol.quote_support import make_attest, make_quote, pcr_values, sign_attest

# --- pcr blob -------------------------------------------------------------------------------------------

BANKS = st.sampled_from(["sha1", "sha256", "sha384", "sha512"])


@st.composite
def bank_and_pcrs(draw):
    bank = draw(BANKS)
    size = tpm2.DIGEST_SIZES[bank]
    chosen = draw(st.sets(st.integers(0, 23)))
    return bank, {p: draw(st.binary(min_size=size, max_size=size)) for p in chosen}


@settings(max_examples=200, deadline=None)
@given(bank_and_pcrs())
def test_pcr_blob_round_trip(bp):
    bank, pcrs = bp
    blob = quote.encode_pcr_blob(bank, pcrs)
    assert len(blob) == 136 + 532 * ((len(pcrs) + 7) // 8)
    assert quote.decode_pcr_blob(blob) == (bank, pcrs)


def test_pcr_blob_layout_by_hand():
    pcrs = pcr_values("sha256", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16])
    blob = quote.encode_pcr_blob("sha256", pcrs)
    # as tpm2_quote -o wrote it for sha256:0-10,16 on swtpm (tpm2-tools 5.4)
    assert blob[:12] == bytes.fromhex("010000000b0003ff07010000")
    assert blob[12:132] == bytes(120)
    assert blob[132:140] == bytes.fromhex("0200000008000000")
    assert blob[140:142] == b"\x20\x00"
    assert blob[142:174] == pcrs[0] and blob[174:206] == bytes(32)
    second = 136 + 532
    assert blob[second : second + 4] == b"\x04\x00\x00\x00"
    assert blob[second + 4 + 3 * 66 + 2 : second + 4 + 3 * 66 + 34] == pcrs[16]
    assert blob[second + 4 + 4 * 66 :] == bytes(4 * 66)
    assert len(blob) == 1200


def test_encode_pcr_blob_rejects_bad_input():
    with pytest.raises(ValidationError):
        quote.encode_pcr_blob("md5", {})
    with pytest.raises(ValidationError):
        quote.encode_pcr_blob("sha256", {24: bytes(32)})
    with pytest.raises(ValidationError):
        quote.encode_pcr_blob("sha256", {1: bytes(20)})


def test_decode_pcr_blob_rejects_inconsistent_blobs():
    blob = bytearray(quote.encode_pcr_blob("sha256", pcr_values("sha256", [0, 16])))
    bad = []
    b = bytearray(blob)
    b[0] = 2  # two banks
    bad.append(b)
    b = bytearray(blob)
    b[4:6] = b"\x04\x00"  # sha1 id... with 32-byte digests
    bad.append(b)
    b = bytearray(blob)
    b[4:6] = b"\x99\x00"  # unknown bank
    bad.append(b)
    b = bytearray(blob)
    b[6] = 5  # sizeofSelect > 4
    bad.append(b)
    b = bytearray(blob)
    b[7] = 0x07  # three PCRs selected, two values
    bad.append(b)
    b = bytearray(blob)
    b[132] = 2  # two TPML_DIGEST but one present
    bad.append(b)
    b = bytearray(blob)
    b[136] = 9  # 9 digests in a list
    bad.append(b)
    bad.append(blob + b"\x00")
    for raw in bad:
        with pytest.raises(DecodeError):
            quote.decode_pcr_blob(bytes(raw))
    for cut in range(0, len(blob), 37):
        with pytest.raises(DecodeError):
            quote.decode_pcr_blob(bytes(blob[:cut]))


def test_decode_pcr_blob_empty_selection():
    assert quote.decode_pcr_blob(quote.encode_pcr_blob("sha1", {})) == ("sha1", {})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_decode_pcr_blob_random_bytes(raw):
    try:
        quote.decode_pcr_blob(raw)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decode_pcr_blob_mutated(data):
    bank, pcrs = data.draw(bank_and_pcrs())
    blob = bytearray(quote.encode_pcr_blob(bank, pcrs))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    try:
        quote.decode_pcr_blob(bytes(blob))
    except DecodeError:
        pass


# --- TPMS_ATTEST / TPMT_SIGNATURE: the hand decoder agrees with tpm2-pytss ------------------------


def test_decode_attest_fields():
    pcrs = pcr_values("sha384", [0, 7, 16])
    raw = make_attest(nonce=b"n0nce", bank="sha384", pcrs=pcrs, clock=(77, 5, 2, 1))
    info = quote.decode_attest(raw)
    assert info.extra_data == b"n0nce"
    assert info.clock == quote.ClockInfo(77, 5, 2, 1)
    assert info.firmware_version == 0x2019102300163636
    assert info.qualified_signer == b"\x00\x0b" + bytes(range(32))
    assert info.pcr_select == (quote.PcrSelection(0x000C, (0, 7, 16)),)
    assert info.pcr_select[0].bank == "sha384"
    assert info.pcr_digest == hashlib.sha384(pcrs[0] + pcrs[7] + pcrs[16]).digest()


def _pytss(cls, raw):
    try:
        obj, used = cls.unmarshal(raw)
    except TSS2_Exception:
        return None
    return obj if used == len(raw) else None


def _agree_attest(raw: bytes) -> None:
    try:
        mine = quote.decode_attest(raw)
    except DecodeError:
        mine = None
    ref = _pytss(TPMS_ATTEST, raw)
    if ref is not None and (ref.magic != TPM2_GENERATED.VALUE or ref.type != TPM2_ST.ATTEST_QUOTE):
        ref = None
    assert (mine is None) == (ref is None)
    if mine is None:
        return
    assert mine.extra_data == bytes(ref.extraData)
    assert mine.qualified_signer == bytes(ref.qualifiedSigner)
    ci = ref.clockInfo
    assert mine.clock == quote.ClockInfo(ci.clock, ci.resetCount, ci.restartCount, ci.safe)
    assert mine.firmware_version == ref.firmwareVersion
    q = ref.attested.quote
    assert mine.pcr_digest == bytes(q.pcrDigest)
    assert len(mine.pcr_select) == q.pcrSelect.count
    for sel, rsel in zip(mine.pcr_select, q.pcrSelect, strict=False):
        assert sel.hash_alg == rsel.hash
        bits = bytes(rsel.pcrSelect)[: rsel.sizeofSelect]
        assert sel.pcrs == tuple(i for i in range(len(bits) * 8) if int.from_bytes(bits, "little") >> i & 1)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_attest_agrees_with_tpm2_pytss_on_mutations(data):
    raw = bytearray(make_attest())
    op = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif op == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    _agree_attest(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_attest_random_bytes(raw):
    _agree_attest(b"\xff\x54\x43\x47\x80\x18" + raw)
    try:
        quote.decode_attest(raw)
    except DecodeError:
        pass


@pytest.mark.parametrize(
    ("kind", "scheme"), [("rsa", "rsassa"), ("rsa", "rsapss"), ("p256", ""), ("p384", "")]
)
def test_decode_signature_matches_tpm2_pytss(kind, scheme):
    raw = sign_attest(b"data", kind, "sha384", scheme)
    sig = quote.decode_signature(raw)
    ref = TPMT_SIGNATURE.unmarshal(raw)[0]
    assert sig.sig_alg == ref.sigAlg
    assert sig.hash_alg == tpm2.HASH_ALGS["sha384"]
    if kind == "rsa":
        assert sig.sig == bytes(ref.signature.rsassa.sig)
    else:
        assert (sig.r, sig.s) == (
            bytes(ref.signature.ecdsa.signatureR),
            bytes(ref.signature.ecdsa.signatureS),
        )
    assert quote.encode_signature(sig) == raw


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_signature_mutations_only_decode_error(data):
    raw = bytearray(sign_attest(b"x", data.draw(st.sampled_from(["rsa", "p256"]))))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    else:
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        sig = quote.decode_signature(bytes(raw))
    except DecodeError:
        return
    ref = _pytss(TPMT_SIGNATURE, bytes(raw))
    assert ref is not None and ref.sigAlg == sig.sig_alg


# --- quote string -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_quote_string_round_trip(kind):
    pcrs = pcr_values("sha256", [0, 10, 16])
    attest = make_attest(pcrs=pcrs)
    sig = sign_attest(attest, kind)
    blob = quote.encode_pcr_blob("sha256", pcrs)
    text = quote.build_quote(attest, sig, blob)
    assert text.startswith("r") and text.count(":") == 2
    q = quote.parse_quote(text)
    assert (q.attest_raw, q.signature_raw, q.pcr_blob) == (attest, sig, blob)
    assert (q.bank, q.pcrs) == ("sha256", pcrs)
    assert q.clock == quote.ClockInfo(100_000, 3, 1, 1)
    # the tpm2-pytss views
    assert bytes(q.attest.extraData) == b"abcdefghij0123456789"
    assert q.signature.marshal() == sig
    assert quote.build_quote(attest, q.signature, blob) == text


def test_parse_quote_rejects_malformed():
    good = make_quote()
    _, a, s, p = ("r", *good[1:].split(":"))
    wrong_magic = base64.b64encode(b"\x00" + base64.b64decode(a)[1:]).decode()
    attest = bytearray(base64.b64decode(a))
    attest[4:6] = struct.pack(">H", 0x8017)  # TPM_ST_ATTEST_CERTIFY
    wrong_type = base64.b64encode(bytes(attest)).decode()
    trailing = base64.b64encode(base64.b64decode(a) + b"\x00").decode()
    hmac_sig = base64.b64encode(b"\x00\x05\x00\x0b" + bytes(32)).decode()  # sigAlg HMAC
    bad = [
        good[1:],  # no "r"
        "x" + good[1:],
        f"r{a}:{s}",  # two parts
        f"r{a}:{s}:{p}:{p}",
        f"r{a}!:{s}:{p}",  # not base64
        f"r{a}:{s}:{p[:-2]}",  # bad padding
        f"r{wrong_magic}:{s}:{p}",
        f"r{wrong_type}:{s}:{p}",
        f"r{trailing}:{s}:{p}",
        f"r{a}:{hmac_sig}:{p}",  # unsupported sigAlg
        f"r{a}:{s}:",
        "r" + "A" * 20000,
        "",
    ]
    for text in bad:
        with pytest.raises(DecodeError):
            quote.parse_quote(text)
    with pytest.raises(DecodeError):
        quote.parse_quote(None)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parse_quote_random_text(text):
    try:
        quote.parse_quote(text)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_quote_random_parts(data):
    parts = [base64.b64encode(data.draw(st.binary(max_size=300))).decode() for _ in range(3)]
    try:
        quote.parse_quote("r" + ":".join(parts))
    except ProtocolError:
        pass


def test_clock_info_json():
    ci = quote.ClockInfo(5, 1, 2, 1)
    assert ci.to_json() == {"clock": 5, "resetcount": 1, "restartcount": 2, "safe": 1}
    assert quote.ClockInfo.from_json(ci.to_json()) == ci
    for bad in (
        {},
        None,
        {"clock": -1, "resetcount": 1, "restartcount": 2, "safe": 1},
        {"clock": "5", "resetcount": 1, "restartcount": 2, "safe": 1},
    ):
        with pytest.raises(DecodeError):
            quote.ClockInfo.from_json(bad)


def _parse_uncached(text: str) -> object:
    """parse_quote as it was before the PCR-blob memo: every part decoded, in this order."""
    try:
        if len(text) > 16384 or not text.startswith("r") or len(parts := text[1:].split(":")) != 3:
            return quote._parse_quote.__wrapped__(text)  # refused before any part is looked at
        raw = [quote._b64(part, what) for part, what in zip(parts, ("TPMS_ATTEST", "TPMT_SIGNATURE", "pcr blob"),
                                                            strict=True)]
        info, sig = quote.decode_attest(raw[0]), quote.decode_signature(raw[1])
        return quote.ParsedQuote(*raw, info, sig, *quote.decode_pcr_blob(raw[2]))
    except DecodeError as exc:
        return ("raised", str(exc))


def _parse_known_blob(text: str) -> object:
    """parse_quote with the text's blob part already remembered (when it decodes at all)."""
    parts = text[1:].split(":")
    if len(parts) == 3:
        try:
            blob = base64.b64decode(parts[2], validate=True)
            quote._BLOBS[parts[2]] = (blob, *quote.decode_pcr_blob(blob))
        except (ValueError, ProtocolError):
            pass
    try:
        return quote._parse_quote.__wrapped__(text)
    except DecodeError as exc:
        return ("raised", str(exc))


def test_a_remembered_pcr_blob_parses_as_a_new_one():
    """The blob memo gives the same ParsedQuote or the same first error as decoding every part,
    on good quotes and on quotes broken in one or two parts (the error order across parts holds:
    a bad attest is named before a good blob, a bad blob's base64 before a bad attest)."""
    pcrs = pcr_values("sha256", [0, 10, 16])
    attest = make_attest(pcrs=pcrs)
    good = quote.build_quote(attest, sign_attest(attest, "rsa"), quote.encode_pcr_blob("sha256", pcrs))
    _, a, s, p = ("r", *good[1:].split(":"))
    bad_attest = base64.b64encode(b"\x00" + base64.b64decode(a)[1:]).decode()
    bad_blob = base64.b64encode(base64.b64decode(p)[:-3]).decode()
    texts = [good, f"r{bad_attest}:{s}:{p}", f"r{a}:{s}:{bad_blob}", f"r{bad_attest}:{s}:{bad_blob}",
             f"r{bad_attest}:{s}:{p}!", f"r{a}!:{s}:{p}", f"r{a}:AAAA:{p}", f"r{a}:{s}:"]
    for text in texts:
        assert _parse_known_blob(text) == _parse_uncached(text), text
    # each caller gets its own values dict: a change to one does not reach the next parse
    quote._BLOBS.clear()
    first = quote._parse_quote.__wrapped__(good)
    first.pcrs[10] = b"changed"
    again = quote._parse_quote.__wrapped__(good)
    assert again.pcrs == pcrs and again == _parse_uncached(good)
    again.pcrs[10] = b"changed"
    assert quote._parse_quote.__wrapped__(good).pcrs == pcrs
    # bounded: full, it starts again
    quote._BLOBS.update({str(i): quote._BLOBS[p] for i in range(quote._BLOBS_MAX)})
    quote._parse_quote.__wrapped__(f"r{a}:{s}:{base64.b64encode(quote.encode_pcr_blob('sha256', pcr_values('sha256', [1]))).decode()}")
    assert len(quote._BLOBS) == 1


def _decode(raw: bytes, *, known: bytes | None) -> object:
    """decode_attest with only ``known``'s layout remembered (None: none, the full decoder)."""
    quote._SHAPES.clear()
    if known is not None:
        quote.decode_attest(known)
    try:
        return quote.decode_attest(raw)
    except DecodeError as exc:
        return ("raised", str(exc))
    finally:
        quote._SHAPES.clear()


def test_a_remembered_attest_layout_decodes_as_the_full_decoder():
    """The layout memo gives the same QuoteAttest or the same error as the full decoder: on
    attests of the same layout with other nonces, clocks, firmware and digests (and that it is
    taken for them), and on every byte of the attest replaced, truncations and extensions, other
    signers, nonce sizes, selections and digest sizes."""
    good = make_attest()
    same_layout = [make_attest(nonce=b"z" * 20, clock=(1 << 63, 2**32 - 1, 0, 255)),
                   make_attest(pcrs=pcr_values("sha256", [0, 1, 2, 10, 16]) | {10: b"\x07" * 32}),
                   good[:-32] + bytes(32)]
    for raw in same_layout:
        fast = _decode(raw, known=good)
        assert fast == _decode(raw, known=None)
        quote._SHAPES.clear()
        quote.decode_attest(good)
        assert quote.decode_attest(raw).qualified_signer is quote._SHAPES[good[:10 + 34]][7]  # taken
    other_layouts = [make_attest(nonce=b"short"), make_attest(signer=b"\x00\x0b" + bytes(range(1, 33))),
                     make_attest(pcrs=pcr_values("sha256", [0, 10, 16])), make_attest(bank="sha1"),
                     make_attest(select=("sha1", [0, 1, 2, 10, 16])), make_attest(digest_alg="sha384")]
    mutated = [good[:at] + bytes([v]) + good[at + 1:] for at in range(len(good)) for v in (0, 1, 0x7F, 0xFF)
               if good[at] != v]
    cut = [good[:n] for n in range(len(good))] + [good + b"\x00", good + good[-3:], b""]
    for raw in other_layouts + mutated + cut:
        assert _decode(raw, known=good) == _decode(raw, known=None), raw.hex()
    # bounded: full, it starts again
    quote._SHAPES.update({bytes([i % 256, i // 256]): quote._SHAPES.get(b"", ()) for i in range(quote._SHAPES_MAX)})
    quote.decode_attest(good)
    assert len(quote._SHAPES) == 1
    quote._SHAPES.clear()
