"""The tpm2-tools PCR blob: what ``tpm2_quote -o`` writes, and the push model's ``subject_data``.

It is a little-endian dump of tpm2-tools' in-memory C structs (x86-64 layout, tpm2-tools 5.x):

    TPML_PCR_SELECTION   u32 count, then 16 slots of TPMS_PCR_SELECTION
                         (u16 hash, u8 sizeofSelect, u8 pcrSelect[4], 1 byte padding)   = 132 bytes
    u32 n                the number of TPML_DIGEST that follow
    n x TPML_DIGEST      u32 count, then 8 slots of TPM2B_DIGEST (u16 size, 64 bytes)    = 532 bytes each

The digests are the selected PCR values bank by bank (in selection order), PCRs ascending within
a bank, 8 per TPML_DIGEST (one TPM2_PCR_Read answers at most 8). :func:`decode` accepts any
split of the values over the lists (a TPM may answer fewer than 8 per read); :func:`encode` writes
the split tpm2-tools writes. Upstream Keylime's push verifier requires exactly this blob as the
``subject_data`` of a ``tpm_quote`` evidence item (base64).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Mapping
from typing import Any

from keytrio.protocol import validation
from keytrio.protocol.errors import DecodeError, ValidationError
from keytrio.protocol.tpm2 import DIGEST_SIZES, HASH_ALGS, HASH_NAMES

MAX_PCR = validation.MAX_PCR  # one name: the highest PCR index of a TPM 2.0 PC client
SLOTS = 16  # TPM2_NUM_PCR_BANKS
SLOT = struct.Struct("<HB4sx")
SELECT_MAX = 4  # TPM2_PCR_SELECT_MAX
DIGESTS_PER_LIST = 8
DIGEST_SLOT = 2 + 64  # u16 size + sizeof(TPMU_HA)
LIST_SIZE = 4 + DIGESTS_PER_LIST * DIGEST_SLOT  # 532
SELECTION_SIZE = 4 + SLOTS * SLOT.size  # 132

#: bank -> {pcr: value}
Banks = dict[str, dict[int, bytes]]


def _bitmap(pcrs: list[int]) -> bytes:
    bits = 0
    for p in pcrs:
        bits |= 1 << p
    return bits.to_bytes(SELECT_MAX, "little")


def _pcrs(bitmap: bytes) -> list[int]:
    bits = int.from_bytes(bitmap, "little")
    return [i for i in range(len(bitmap) * 8) if bits >> i & 1]


def encode(banks: Mapping[str, Mapping[int, bytes]]) -> bytes:
    """The blob for ``{bank: {pcr: value}}`` (banks in the mapping's order). ValidationError on bad input."""
    if len(banks) > SLOTS:
        raise ValidationError("banks", f"at most {SLOTS} banks")
    out = bytearray(struct.pack("<I", len(banks)))
    values: list[tuple[int, bytes]] = []
    for bank, pcrs in banks.items():
        halg = HASH_ALGS.get(bank)
        if halg is None:
            raise ValidationError("bank", f"unsupported bank {bank!r}")
        size = DIGEST_SIZES[bank]
        order = sorted(pcrs)
        for p in order:
            if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= MAX_PCR:
                raise ValidationError("pcrs", f"PCR {p!r} out of range 0-{MAX_PCR}")
            if not isinstance(pcrs[p], (bytes, bytearray)) or len(pcrs[p]) != size:
                raise ValidationError("pcrs", f"{bank} PCR {p} value is not {size} bytes")
            values.append((size, bytes(pcrs[p])))
        out += SLOT.pack(halg, 3, _bitmap(order))
    out += bytes(SLOT.size * (SLOTS - len(banks)))
    chunks = [values[i : i + DIGESTS_PER_LIST] for i in range(0, len(values), DIGESTS_PER_LIST)]
    out += struct.pack("<I", len(chunks))
    for chunk in chunks:
        out += struct.pack("<I", len(chunk))
        for size, value in chunk:
            out += struct.pack("<H", size) + value + bytes(64 - size)
        out += bytes(DIGEST_SLOT * (DIGESTS_PER_LIST - len(chunk)))
    return bytes(out)


def decode(raw: bytes) -> Banks:
    """``{bank: {pcr: value}}`` from a blob; DecodeError on anything malformed (never IndexError)."""
    raw = bytes(raw)
    if len(raw) < SELECTION_SIZE + 4:
        raise DecodeError("pcr blob: truncated")
    (count,) = struct.unpack_from("<I", raw, 0)
    if count > SLOTS:
        raise DecodeError(f"pcr blob: {count} PCR selections exceed {SLOTS}")
    wanted: list[tuple[str, int]] = []
    out: Banks = {}
    for i in range(count):
        halg, size_sel, bitmap = SLOT.unpack_from(raw, 4 + i * SLOT.size)
        bank = HASH_NAMES.get(halg)
        if bank is None:
            raise DecodeError(f"pcr blob: unsupported bank {halg:#06x}")
        if bank in out:
            raise DecodeError(f"pcr blob: bank {bank} selected twice")
        out[bank] = {}
        if size_sel > SELECT_MAX:
            raise DecodeError(f"pcr blob: sizeofSelect {size_sel} exceeds {SELECT_MAX}")
        selected = _pcrs(bitmap[:size_sel])
        if selected and selected[-1] > MAX_PCR:
            raise DecodeError(f"pcr blob: PCR {selected[-1]} out of range 0-{MAX_PCR}")
        wanted.extend((bank, p) for p in selected)
    (nlists,) = struct.unpack_from("<I", raw, SELECTION_SIZE)
    if len(raw) != SELECTION_SIZE + 4 + nlists * LIST_SIZE:
        raise DecodeError("pcr blob: length does not match its digest list count")
    digests: list[bytes] = []
    off = SELECTION_SIZE + 4
    for _ in range(nlists):
        (n,) = struct.unpack_from("<I", raw, off)
        if n > DIGESTS_PER_LIST:
            raise DecodeError(f"pcr blob: TPML_DIGEST count {n} exceeds {DIGESTS_PER_LIST}")
        for i in range(n):
            at = off + 4 + i * DIGEST_SLOT
            (sz,) = struct.unpack_from("<H", raw, at)
            if sz > 64:
                raise DecodeError(f"pcr blob: digest of {sz} bytes")
            digests.append(raw[at + 2 : at + 2 + sz])
        off += LIST_SIZE
    if len(digests) != len(wanted):
        raise DecodeError(f"pcr blob: {len(wanted)} PCRs selected but {len(digests)} values")
    for (bank, pcr), value in zip(wanted, digests, strict=True):
        if len(value) != DIGEST_SIZES[bank]:
            raise DecodeError(f"pcr blob: {bank} PCR {pcr} value of {len(value)} bytes")
        out[bank][pcr] = value
    return out


def decode_single(raw: bytes) -> tuple[str, dict[int, bytes]]:
    """(bank, {pcr: value}) of a blob that selects exactly one bank (what a quote of one bank writes).

    An agent sends the same selection every poll: the layout of a blob that decoded is kept
    (keyed by its selection and list count, i.e. the first 136 bytes), and a later blob with the
    same head is taken apart by one ``struct`` unpack whose count and size fields must equal the
    layout's; anything else (another split of the values, a bad size) goes through :func:`decode`.
    """
    raw = bytes(raw)
    head = raw[: SELECTION_SIZE + 4]
    layout = _LAYOUTS.get(head)
    if layout is not None and len(raw) == layout.size:
        fields = layout.struct.unpack(raw)
        if layout.structure(fields) == layout.expected:
            return layout.bank, dict(zip(layout.pcrs, layout.values(fields), strict=True))
    banks = decode(raw)
    if len(banks) != 1:
        raise DecodeError(f"pcr blob: {len(banks)} PCR banks selected, expected 1")
    ((bank, pcrs),) = banks.items()
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    layout = _Layout.of(bank, tuple(pcrs))
    if layout is not None and layout.size == len(raw):
        _LAYOUTS[head] = layout
    return bank, pcrs


class _Layout:
    """How :func:`encode` lays out the values of one bank's selection: one ``struct`` for the blob,
    the indices of its count/size fields (with the values they must have) and of the values."""

    __slots__ = ("bank", "expected", "pcrs", "size", "struct", "structure", "values")
    values: Callable[[tuple[Any, ...]], tuple[bytes, ...]]

    def __init__(self, bank: str, pcrs: tuple[int, ...], fmt: str, structure: list[int],
                 expected: tuple[int, ...], values: list[int]) -> None:
        self.bank, self.pcrs = bank, pcrs
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.structure = operator.itemgetter(*structure)
        self.expected = expected
        # itemgetter of one index returns the item itself, not a 1-tuple
        self.values = operator.itemgetter(*values) if len(values) > 1 else (lambda t, i=values[0]: (t[i],))

    @classmethod
    def of(cls, bank: str, pcrs: tuple[int, ...]) -> _Layout | None:
        if not pcrs:
            return None
        size = DIGEST_SIZES[bank]
        fmt = [f"<{SELECTION_SIZE}xI"]
        nlists = -(-len(pcrs) // DIGESTS_PER_LIST)
        structure, expected, values = [0], [nlists], []
        at = 1
        for start in range(0, len(pcrs), DIGESTS_PER_LIST):
            n = min(DIGESTS_PER_LIST, len(pcrs) - start)
            fmt.append("I")
            structure.append(at)
            expected.append(n)
            at += 1
            for _ in range(n):
                fmt.append(f"H{size}s{DIGEST_SLOT - 2 - size}x")
                structure.append(at)
                expected.append(size)
                values.append(at + 1)
                at += 2
            if n < DIGESTS_PER_LIST:
                fmt.append(f"{DIGEST_SLOT * (DIGESTS_PER_LIST - n)}x")
        return cls(bank, pcrs, "".join(fmt), structure, tuple(expected), values)


_MAX_LAYOUTS = 64
_LAYOUTS: dict[bytes, _Layout] = {}
