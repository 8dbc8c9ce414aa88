"""TCG PC Client UEFI event logs: the vocabulary every room of the log shares.

Event types (names as tpm2_eventlog prints them), TPM algorithm ids and digest sizes, well-known
GUIDs, the values :class:`Event` and :class:`EventLog`, :class:`EventLogError` (a
:class:`~protocol.errors.DecodeError` naming the byte offset) and the little-endian
:class:`ByteReader`. The rooms built on it:

- :mod:`protocol.eventlog_parse`: the binary log (crypto-agile or SHA-1 layout) -> :class:`EventLog`;
- :mod:`protocol.eventlog_data`: event data decoders (UEFI variables, device paths, ...) and
  whether an event's data is what its digests measured;
- :mod:`protocol.eventlog_replay`: the events folded into PCR values of one bank.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from keytrio.protocol.errors import DecodeError

# --- event types (names as tpm2_eventlog prints them) --------------------------------------------

EV_PREBOOT_CERT = 0x00000000
EV_POST_CODE = 0x00000001
EV_UNUSED = 0x00000002
EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_ACTION = 0x00000005
EV_EVENT_TAG = 0x00000006
EV_S_CRTM_CONTENTS = 0x00000007
EV_S_CRTM_VERSION = 0x00000008
EV_CPU_MICROCODE = 0x00000009
EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
EV_TABLE_OF_DEVICES = 0x0000000B
EV_COMPACT_HASH = 0x0000000C
EV_IPL = 0x0000000D
EV_IPL_PARTITION_DATA = 0x0000000E
EV_NONHOST_CODE = 0x0000000F
EV_NONHOST_CONFIG = 0x00000010
EV_NONHOST_INFO = 0x00000011
EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
EV_EFI_EVENT_BASE = 0x80000000
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2

EVENT_TYPE_NAMES: dict[int, str] = {
    value: name for name, value in list(globals().items()) if name.startswith("EV_") and isinstance(value, int)
}


def event_type_name(event_type: int) -> str:
    return EVENT_TYPE_NAMES.get(event_type, f"0x{event_type:08x}")


# --- algorithms ----------------------------------------------------------------------------------

ALG_IDS = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512", 0x0012: "sm3_256",
           0x0027: "sha3_256", 0x0028: "sha3_384", 0x0029: "sha3_512"}  # fmt: skip
ALG_BY_NAME = {v: k for k, v in ALG_IDS.items()}
#: the TPM hash algorithms a log may name and keytrio can hash, with their digest sizes: more than
#: the banks keytrio quotes (tpm2.DIGEST_SIZES), since firmware may extend banks a quote never reads
LOG_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32,
                    "sha3_256": 32, "sha3_384": 48, "sha3_512": 64}  # fmt: skip


def alg_name(alg_id: int) -> str:
    return ALG_IDS.get(alg_id, f"alg_0x{alg_id:04x}")


def _sm3(data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes  # only logs with an sm3_256 bank need it

    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def hash_data(bank: str, data: bytes) -> bytes:
    """``data`` hashed with the algorithm of ``bank``; EventLogError when keytrio has no such hash."""
    if bank == "sm3_256":
        try:
            return hashlib.new("sm3", data).digest()
        except ValueError:
            return _sm3(data)
    if bank not in LOG_DIGEST_SIZES:
        raise EventLogError(f"no implementation of the {bank} hash algorithm", 0)
    return hashlib.new(bank, data).digest()


# --- well-known GUIDs (text form as tpm2-tools >= 5.2 prints them) ------------------------------

EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
SHIM_LOCK_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"
EFI_CERT_X509_GUID = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072"
EFI_CERT_SHA256_GUID = "c1c41626-504c-4092-aca9-41f936934328"

MAX_EVENT_SIZE = 16 * 1024 * 1024  # a single event's data; anything larger is a broken log
#: the data of the EV_NO_ACTION event that sets PCR 0's initial value (its last byte is the locality)
STARTUP_LOCALITY = b"StartupLocality\x00"
FORMAT_CRYPTO_AGILE = "crypto-agile"
FORMAT_SHA1 = "sha1"


class EventLogError(DecodeError):
    """The bytes are not a TCG event log; ``offset`` says where parsing stopped."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


@dataclass
class Event:
    """One event: ``digests`` bank -> digest bytes; ``decoded`` per event type (None if raw only);
    ``offset`` is where its header starts in the log."""

    number: int
    pcr: int
    event_type: int
    digests: dict[str, bytes]
    data: bytes
    decoded: Any = None
    decode_error: str | None = None
    offset: int = 0

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def where(self) -> str:
        return f"event {self.number} (PCR {self.pcr}, {self.type_name}, byte {self.offset})"

    def to_json(self) -> dict[str, Any]:
        return {
            "EventNum": self.number,
            "PCRIndex": self.pcr,
            "EventType": self.type_name,
            "Digests": [{"AlgorithmId": b, "Digest": d.hex()} for b, d in self.digests.items()],
            "EventSize": len(self.data),
            "Event": self.decoded if self.decoded is not None else self.data.hex(),
        }


@dataclass
class SpecId:
    platform_class: int
    spec_version: tuple[int, int, int]
    uintn_size: int
    algorithms: dict[str, int]  # bank -> digest size, in log order
    vendor_info: bytes


@dataclass
class EventLog:
    """``spec_id`` is None for a SHA-1-format log; ``events[0]`` is then a real (usually extended)
    event, in a crypto-agile log the Spec ID event."""

    spec_id: SpecId | None
    events: list[Event] = field(default_factory=list)

    @property
    def format(self) -> str:
        return FORMAT_SHA1 if self.spec_id is None else FORMAT_CRYPTO_AGILE

    @property
    def algorithms(self) -> dict[str, int]:
        """bank -> digest size (a SHA-1-format log has the one bank sha1)."""
        return {"sha1": 20} if self.spec_id is None else self.spec_id.algorithms

    @property
    def banks(self) -> list[str]:
        return list(self.algorithms)


# --- a little reader ------------------------------------------------------------------------------


class ByteReader:
    """Little-endian fields from ``data[offset:end]``; running past ``end`` is an EventLogError."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = offset
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise EventLogError(f"truncated {what}", self.pos)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def guid(self, what: str) -> str:
        return str(uuid.UUID(bytes_le=self.take(16, what)))

    @property
    def remaining(self) -> int:
        return self.end - self.pos
