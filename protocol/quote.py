"""The Keylime quote string and the structures inside it.

``"r" + b64(TPMS_ATTEST) + ":" + b64(TPMT_SIGNATURE) + ":" + b64(pcr blob)``, where the pcr blob is
what ``tpm2_quote -o`` (tpm2-tools 5.4) writes: the in-memory C structs TPML_PCR_SELECTION,
a u32 count and that many TPML_DIGEST, little-endian and unmarshalled.

TPMS_ATTEST and TPMT_SIGNATURE are decoded by hand here: tpm2-pytss unmarshalling plus attribute
access costs ~0.4 ms per quote, ten times the signature check, and the verifier decodes a quote
per agent per poll. The tpm2-pytss objects are still available (lazily) as ``ParsedQuote.attest``
and ``ParsedQuote.signature``; the tests check both decoders agree.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from tpm2_pytss.types import TPMS_ATTEST, TPMT_SIGNATURE

from keytrio.protocol import pcr_blob
from keytrio.protocol.errors import DecodeError
from keytrio.protocol.tpm2 import HASH_NAMES, unmarshal_exact

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

# Limits as the TSS headers size the buffers (so both decoders accept the same inputs).
_MAX_NAME = 66  # TPM2B_NAME: sizeof(TPMU_NAME) = sizeof(TPMT_HA)
_MAX_DATA = 66  # TPM2B_DATA: sizeof(TPMT_HA)
_MAX_DIGEST = 64  # TPM2B_DIGEST: sizeof(TPMU_HA)
_MAX_BANKS = 16  # TPM2_NUM_PCR_BANKS
_MAX_SELECT = 4  # TPM2_PCR_SELECT_MAX
_MAX_RSA = 512  # TPM2_MAX_RSA_KEY_BYTES
_MAX_ECC = 128  # TPM2_MAX_ECC_KEY_BYTES

ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECSCHNORR = 0x001C
_RSA_SIGS = (ALG_RSASSA, ALG_RSAPSS)
_ECC_SIGS = (ALG_ECDSA, ALG_ECSCHNORR)

# the longest quote text parse_quote takes; push_wire.parsed_quote keeps the same bound on the
# bytes it decodes, so that the two paths cannot part there
MAX_QUOTE_TEXT = 16384
# TPMS_CLOCK_INFO, firmwareVersion and the TPML_PCR_SELECTION count in one unpack
_CLOCK_FW_COUNT = struct.Struct(">QIIBQI")


class _Reader:
    """Big-endian cursor over TPM-marshalled bytes; every overrun is a DecodeError."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise DecodeError(f"{self.what}: truncated")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def tpm2b(self, limit: int, field: str) -> bytes:
        size = self.u16()
        if size > limit:
            raise DecodeError(f"{self.what}: {field} of {size} bytes exceeds {limit}")
        return self.take(size)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{self.what}: {len(self.buf) - self.pos} trailing bytes")


# --- value types --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO. ``to_json``/``from_json`` use the keys upstream stores (``tpm_clockinfo``)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: int

    def to_json(self) -> dict[str, int]:
        return {
            "clock": self.clock,
            "resetcount": self.reset_count,
            "restartcount": self.restart_count,
            "safe": self.safe,
        }

    def json_text(self) -> str:
        """``json.dumps(self.to_json(), sort_keys=True)``, without the encoder (once per poll)."""
        return (f'{{"clock": {int(self.clock)}, "resetcount": {int(self.reset_count)}, '
                f'"restartcount": {int(self.restart_count)}, "safe": {int(self.safe)}}}')

    @classmethod
    def from_json(cls, data: Any) -> ClockInfo:
        try:
            vals = [data[k] for k in ("clock", "resetcount", "restartcount", "safe")]
        except (KeyError, TypeError) as exc:
            raise DecodeError(f"clock info: missing {exc}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise DecodeError("clock info: fields must be non-negative integers")
        return cls(*vals)


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a hash algorithm id and the selected PCR indices (ascending)."""

    hash_alg: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str | None:
        return HASH_NAMES.get(self.hash_alg)


@dataclass(frozen=True)
class QuoteAttest:
    """The fields of a TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE."""

    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE of an asymmetric scheme: RSA ``sig`` or ECC ``r``/``s``."""

    sig_alg: int
    hash_alg: int
    sig: bytes = b""
    r: bytes = b""
    s: bytes = b""


@lru_cache(maxsize=64)
def _bitmap_to_pcrs(bitmap: bytes) -> tuple[int, ...]:
    bits = int.from_bytes(bitmap, "little")
    return tuple(i for i in range(len(bitmap) * 8) if bits >> i & 1)


_U16 = struct.Struct(">H")
_ATTEST_HEAD = struct.Struct(">IHH")  # magic, type, qualifiedSigner size
_SELECTION_HEAD = struct.Struct(">HB")
_SIG_HEAD = struct.Struct(">HHH")  # sigAlg, hash, first TPM2B size


def decode_attest(raw: bytes) -> QuoteAttest:
    """Decode a marshalled TPMS_ATTEST that must be a quote generated by a TPM.

    (Field by field with ``struct`` at running offsets: this runs once per poll.)"""
    buf = bytes(raw)
    end = len(buf)
    if end >= 8:
        shape = _SHAPES.get(buf[:10 + _U16.unpack_from(buf, 6)[0]])
        if shape is not None and end == shape[0] and buf[shape[3]:shape[4]] == shape[5]:
            _, head, clock_at, _, digest_at, _, count, signer, sels = shape
            clk, resets, restarts, safe, firmware, n = _CLOCK_FW_COUNT.unpack_from(buf, clock_at)
            if n == count:
                return QuoteAttest(signer, buf[head:clock_at], ClockInfo(clk, resets, restarts, safe), firmware, sels,
                                   buf[digest_at:])

    def truncated() -> DecodeError:
        return DecodeError("TPMS_ATTEST: truncated")

    if end < 8:
        if end >= 4 and int.from_bytes(buf[:4], "big") != TPM_GENERATED_VALUE:
            raise DecodeError("TPMS_ATTEST: magic is not TPM_GENERATED_VALUE")
        if end >= 6 and int.from_bytes(buf[4:6], "big") != TPM_ST_ATTEST_QUOTE:
            raise DecodeError("TPMS_ATTEST: type is not TPM_ST_ATTEST_QUOTE")
        raise truncated()
    magic, kind, size = _ATTEST_HEAD.unpack_from(buf, 0)
    if magic != TPM_GENERATED_VALUE:
        raise DecodeError("TPMS_ATTEST: magic is not TPM_GENERATED_VALUE")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise DecodeError("TPMS_ATTEST: type is not TPM_ST_ATTEST_QUOTE")
    if size > _MAX_NAME:
        raise DecodeError(f"TPMS_ATTEST: qualifiedSigner of {size} bytes exceeds {_MAX_NAME}")
    pos = 8 + size
    if pos + 2 > end:
        raise truncated()
    signer = buf[8:pos]
    (size,) = _U16.unpack_from(buf, pos)
    if size > _MAX_DATA:
        raise DecodeError(f"TPMS_ATTEST: extraData of {size} bytes exceeds {_MAX_DATA}")
    pos += 2
    if pos + size > end:
        raise truncated()
    extra = buf[pos:pos + size]
    pos += size
    if pos + _CLOCK_FW_COUNT.size > end:
        raise truncated()
    clk, resets, restarts, safe, firmware, count = _CLOCK_FW_COUNT.unpack_from(buf, pos)
    pos += _CLOCK_FW_COUNT.size
    clock = ClockInfo(clk, resets, restarts, safe)
    if count > _MAX_BANKS:
        raise DecodeError(f"TPMS_ATTEST: {count} PCR selections exceed {_MAX_BANKS}")
    sels = []
    for _ in range(count):
        if pos + 3 > end:
            raise truncated()
        halg, size = _SELECTION_HEAD.unpack_from(buf, pos)
        pos += 3
        if size > _MAX_SELECT:
            raise DecodeError(f"TPMS_ATTEST: sizeofSelect {size} exceeds {_MAX_SELECT}")
        if pos + size > end:
            raise truncated()
        sels.append(PcrSelection(halg, _bitmap_to_pcrs(buf[pos:pos + size])))
        pos += size
    if pos + 2 > end:
        raise truncated()
    (size,) = _U16.unpack_from(buf, pos)
    if size > _MAX_DIGEST:
        raise DecodeError(f"TPMS_ATTEST: pcrDigest of {size} bytes exceeds {_MAX_DIGEST}")
    pos += 2
    if pos + size > end:
        raise truncated()
    pcr_digest = buf[pos:pos + size]
    pos += size
    if pos != end:
        raise DecodeError(f"TPMS_ATTEST: {end - pos} trailing bytes")
    head = 10 + len(signer)
    clock_at = head + len(extra)
    sel_at = clock_at + _CLOCK_FW_COUNT.size
    digest_at = end - len(pcr_digest)
    if len(_SHAPES) >= _SHAPES_MAX:
        _SHAPES.clear()
    _SHAPES[buf[:head]] = (end, head, clock_at, sel_at, digest_at, buf[sel_at:digest_at], count, signer,
                           sels := tuple(sels))
    return QuoteAttest(signer, extra, clock, firmware, sels, pcr_digest)


#: The layouts of recently decoded TPMS_ATTESTs, by their bytes up to extraData's size (magic,
#: type, the signer's name, the nonce's size): a given AK quotes with the same signer, nonce size,
#: selection and digest size every time; only the nonce, clock, firmware version and digest
#: change. A TPMS_ATTEST of that key, of the same length, whose selection bytes and digest size
#: are those of the layout and whose selection count is too, decodes as the layout says (the
#: fields in between are read as the full decoder reads them, unchecked there as well); anything
#: else takes the full decoder. (total length, extraData at, clock at, selection at, digest at,
#: selection bytes + digest size, selection count, signer, selections). Bounded, emptied when full.
_SHAPES: dict[bytes, tuple[int, int, int, int, int, bytes, int, bytes, tuple[PcrSelection, ...]]] = {}
_SHAPES_MAX = 8192


def decode_signature(raw: bytes) -> Signature:
    """Decode a marshalled TPMT_SIGNATURE of scheme RSASSA, RSAPSS, ECDSA or ECSCHNORR."""
    buf = bytes(raw)
    if len(buf) >= 6 and (alg := _SIG_HEAD.unpack_from(buf, 0))[0] in _RSA_SIGS \
            and alg[2] <= _MAX_RSA and len(buf) == 6 + alg[2]:
        return Signature(alg[0], alg[1], sig=buf[6:])  # the one shape an RSA AK sends
    r = _Reader(buf, "TPMT_SIGNATURE")
    alg = r.u16()
    if alg in _RSA_SIGS:
        halg = r.u16()
        sig = Signature(alg, halg, sig=r.tpm2b(_MAX_RSA, "sig"))
    elif alg in _ECC_SIGS:
        halg = r.u16()
        sig = Signature(alg, halg, r=r.tpm2b(_MAX_ECC, "signatureR"), s=r.tpm2b(_MAX_ECC, "signatureS"))
    else:
        raise DecodeError(f"TPMT_SIGNATURE: unsupported signature algorithm {alg:#06x}")
    r.end()
    return sig


def encode_signature(sig: Signature) -> bytes:
    """Marshal a :class:`Signature` back into TPMT_SIGNATURE bytes."""
    head = struct.pack(">HH", sig.sig_alg, sig.hash_alg)
    if sig.sig_alg in _RSA_SIGS:
        return head + struct.pack(">H", len(sig.sig)) + sig.sig
    return head + struct.pack(">H", len(sig.r)) + sig.r + struct.pack(">H", len(sig.s)) + sig.s


# --- pcr blob ---------------------------------------------------------------------------------------


def encode_pcr_blob(bank: str, pcrs: dict[int, bytes]) -> bytes:
    """The ``tpm2_quote -o`` bytes for one bank: selection, then values ascending, 8 per TPML_DIGEST."""
    return pcr_blob.encode({bank: pcrs})


def decode_pcr_blob(raw: bytes) -> tuple[str, dict[int, bytes]]:
    """(bank, {pcr: value}) from a ``tpm2_quote -o`` blob holding exactly one bank."""
    return pcr_blob.decode_single(raw)


# --- quote string -------------------------------------------------------------------------------------


def build_quote(attest: bytes, signature: bytes | TPMT_SIGNATURE, pcr_blob: bytes) -> str:
    """The Keylime quote string from TPMS_ATTEST bytes, a TPMT_SIGNATURE and a pcr blob."""
    if isinstance(signature, TPMT_SIGNATURE):
        signature = signature.marshal()

    def b64(b: bytes) -> str:
        return base64.b64encode(bytes(b)).decode("ascii")

    return "r" + b64(attest) + ":" + b64(signature) + ":" + b64(pcr_blob)


@dataclass(frozen=True)
class ParsedQuote:
    """A decoded quote string. ``attest`` / ``signature`` give the tpm2-pytss objects on demand."""

    attest_raw: bytes
    signature_raw: bytes
    pcr_blob: bytes
    info: QuoteAttest
    sig: Signature
    bank: str
    pcrs: dict[int, bytes]

    @cached_property
    def attest(self) -> TPMS_ATTEST:
        return unmarshal_exact(TPMS_ATTEST, self.attest_raw)

    @cached_property
    def signature(self) -> TPMT_SIGNATURE:
        return unmarshal_exact(TPMT_SIGNATURE, self.signature_raw)

    @property
    def clock(self) -> ClockInfo:
        return self.info.clock


def _b64(part: str, what: str) -> bytes:
    # strict_mode checks the alphabet and padding in C (validate=True runs a regex first)
    try:
        return binascii.a2b_base64(part, strict_mode=True)  # a str must be ASCII (ValueError)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"quote: {what} is not base64 ({exc})") from None


def parse_quote(text: str) -> ParsedQuote:
    """Decode a Keylime quote string; any malformation is a DecodeError.

    The last few decoded strings are remembered (a poll looks at its quote twice: for the boot
    identity before the checks, then in them); a ParsedQuote is immutable apart from its
    ``pcrs`` dict, which callers copy before changing.
    """
    if not isinstance(text, str):
        raise DecodeError("quote: expected a string")
    return _parse_quote(text)


@lru_cache(maxsize=8)
def _parse_quote(text: str) -> ParsedQuote:
    if len(text) > MAX_QUOTE_TEXT:
        raise DecodeError("quote: too long")
    if not text.startswith("r"):
        raise DecodeError("quote: must start with 'r'")
    parts = text[1:].split(":")
    if len(parts) != 3:
        raise DecodeError(f"quote: expected 3 ':'-separated parts, got {len(parts)}")
    attest_raw = _b64(parts[0], "TPMS_ATTEST")
    sig_raw = _b64(parts[1], "TPMT_SIGNATURE")
    known = _BLOBS.get(parts[2])
    blob = _b64(parts[2], "pcr blob") if known is None else known[0]
    info = decode_attest(attest_raw)
    sig = decode_signature(sig_raw)
    if known is not None:
        return ParsedQuote(attest_raw, sig_raw, blob, info, sig, known[1], dict(known[2]))
    bank, pcrs = decode_pcr_blob(blob)
    if len(_BLOBS) >= _BLOBS_MAX:
        _BLOBS.clear()
    _BLOBS[parts[2]] = (blob, bank, dict(pcrs))
    return ParsedQuote(attest_raw, sig_raw, blob, info, sig, bank, pcrs)


#: The PCR-blob part of recent quotes (its base64 text) -> (blob, bank, values). An agent's PCR
#: values change rarely, so its blob text comes again poll after poll while the attest and the
#: signature never do: its base64 and decode were a third of a quote's parse. Only blobs that
#: decoded are kept (a pure function of the text, so the same errors arise in the same order);
#: callers get their own dict. Bounded (about 2 KB an entry), emptied when full.
_BLOBS: dict[str, tuple[bytes, str, dict[int, bytes]]] = {}
_BLOBS_MAX = 8192
