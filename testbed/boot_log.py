"""A minimal UEFI boot event log (TCG PC Client crypto-agile format) that a machine replays at boot.

It holds what the foundation of a measured boot needs: the Spec ID event (EV_NO_ACTION, SHA-1
log format header) naming the active banks, then one EV_SEPARATOR per PCR 0-7 whose digests are
H(0x00000000) in every bank. :func:`events` gives the PCR extends to perform, so the log and the
PCRs agree. The measured-boot issue makes this richer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004

_ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_SEPARATOR_DATA = b"\x00\x00\x00\x00"


def _spec_id_event(banks: Sequence[str]) -> bytes:
    algs = b"".join(struct.pack("<HH", _ALG_IDS[b], _SIZES[b]) for b in banks)
    body = (
        b"Spec ID Event03\x00"
        + struct.pack("<IBBBB", 0, 0, 2, 0, 2)  # platformClass, spec 2.0 errata 0, uintnSize 2 (64-bit)
        + struct.pack("<I", len(banks))
        + algs
        + b"\x00"  # vendorInfoSize
    )
    # TCG_PCR_EVENT (SHA-1 format): pcrIndex, eventType, 20-byte zero digest, eventSize, event
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def _event2(pcr: int, event_type: int, data: bytes, banks: Sequence[str]) -> bytes:
    digests = b"".join(struct.pack("<H", _ALG_IDS[b]) + hashlib.new(b, data).digest() for b in banks)
    return (struct.pack("<III", pcr, event_type, len(banks)) + digests
            + struct.pack("<I", len(data)) + data)


def events(banks: Sequence[str]) -> list[tuple[int, dict[str, bytes]]]:
    """The PCR extends a boot with :func:`build` performs: ``[(pcr, {bank: digest})]``."""
    return [(pcr, {b: hashlib.new(b, _SEPARATOR_DATA).digest() for b in banks}) for pcr in range(8)]


def build(banks: Sequence[str]) -> bytes:
    """The binary event log matching :func:`events`."""
    unknown = [b for b in banks if b not in _ALG_IDS]
    if unknown:
        raise ValueError(f"unsupported banks {unknown}")
    out = [_spec_id_event(banks)]
    out += [_event2(pcr, EV_SEPARATOR, _SEPARATOR_DATA, banks) for pcr in range(8)]
    return b"".join(out)
