"""TCG PC Client crypto-agile UEFI event log: parse, decode event data, replay per bank.

The log starts with one TCG_PCR_EVENT in the SHA-1 format (the Spec ID event, EV_NO_ACTION,
naming the banks and digest sizes); every later event is a TCG_PCR_EVENT2 with one digest per
bank. :func:`parse` gives an :class:`EventLog`; structural damage (truncation, an unknown
algorithm, a digest count that disagrees with the header, absurd sizes) raises
:class:`EventLogError` (a :class:`~protocol.errors.DecodeError`). Event *data* is decoded where
measured-boot policies need it (UEFI variables with GUIDs and signature lists, boot variables,
image-load device paths, EV_IPL strings, ...); data that does not decode is kept raw with
``decode_error`` set, because real firmware writes odd data and the digests still replay.

:func:`replay` folds the events into PCR values for one bank (EV_NO_ACTION never extends; the
StartupLocality EV_NO_ACTION event sets PCR 0's initial value, as the PC Client spec says).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Callable, Iterable
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

ALG_IDS = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512", 0x0012: "sm3_256"}
ALG_BY_NAME = {v: k for k, v in ALG_IDS.items()}
DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}

# --- well-known GUIDs (text form as tpm2-tools >= 5.2 prints them) ------------------------------

EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
SHIM_LOCK_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"
EFI_CERT_X509_GUID = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072"
EFI_CERT_SHA256_GUID = "c1c41626-504c-4092-aca9-41f936934328"

MAX_EVENT_SIZE = 16 * 1024 * 1024  # a single event's data; anything larger is a broken log
MAX_EVENTS = 1_000_000
_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
_STARTUP_LOCALITY = b"StartupLocality\x00"


class EventLogError(DecodeError):
    """The bytes are not a crypto-agile TCG event log; ``offset`` says where parsing stopped."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


@dataclass
class Event:
    """One event: ``digests`` bank -> digest bytes; ``decoded`` per event type (None if raw only)."""

    number: int
    pcr: int
    event_type: int
    digests: dict[str, bytes]
    data: bytes
    decoded: Any = None
    decode_error: str | None = None

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

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
    spec_id: SpecId
    events: list[Event] = field(default_factory=list)  # events[0] is the Spec ID event

    @property
    def banks(self) -> list[str]:
        return list(self.spec_id.algorithms)


# --- little readers ------------------------------------------------------------------------------


class _Reader:
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


# --- parsing -------------------------------------------------------------------------------------


def _parse_spec_id(body: bytes) -> SpecId:
    r = _Reader(body)
    if r.take(16, "Spec ID signature") != _SPEC_ID_SIGNATURE:
        raise EventLogError("first event is not a 'Spec ID Event03' (not a crypto-agile log)", 0)
    platform_class = r.u32("platformClass")
    minor, major, errata, uintn = r.take(4, "spec version")
    count = r.u32("numberOfAlgorithms")
    if not 1 <= count <= 16:
        raise EventLogError(f"Spec ID names {count} algorithms", 0)
    algs: dict[str, int] = {}
    for _ in range(count):
        alg_id, size = r.u16("algorithmId"), r.u16("digestSize")
        name = ALG_IDS.get(alg_id)
        if name is None:
            raise EventLogError(f"unknown algorithm 0x{alg_id:04x} in Spec ID event", r.pos)
        if size != DIGEST_SIZES[name]:
            raise EventLogError(f"{name} digest size {size} in Spec ID event", r.pos)
        algs[name] = size
    vendor = r.take(r.u8("vendorInfoSize"), "vendorInfo")
    return SpecId(platform_class, (major, minor, errata), uintn, algs, vendor)


def parse(data: bytes, *, decode: bool = True) -> EventLog:
    """Parse a binary crypto-agile event log (``binary_bios_measurements``)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventLogError("event log must be bytes", 0)
    data = bytes(data)
    r = _Reader(data)
    pcr = r.u32("pcrIndex")
    ev_type = r.u32("eventType")
    r.take(20, "SHA-1 digest")
    size = r.u32("eventSize")
    if ev_type != EV_NO_ACTION or pcr != 0:
        raise EventLogError("first event is not the EV_NO_ACTION Spec ID event", 0)
    if size > 4096:
        raise EventLogError("Spec ID event too large", r.pos)
    body = r.take(size, "Spec ID event")
    spec = _parse_spec_id(body)
    first = Event(0, 0, EV_NO_ACTION, {"sha1": bytes(20)}, body)
    first.decoded = {"SpecID": {"algorithms": dict(spec.algorithms), "uintnSize": spec.uintn_size,
                                "platformClass": spec.platform_class}}
    log = EventLog(spec, [first])
    while r.remaining:
        start = r.pos
        pcr = r.u32("pcrIndex")
        ev_type = r.u32("eventType")
        count = r.u32("digest count")
        if count != len(spec.algorithms):
            raise EventLogError(f"event has {count} digests, the Spec ID event names {len(spec.algorithms)}", start)
        digests: dict[str, bytes] = {}
        for _ in range(count):
            alg_id = r.u16("algorithmId")
            name = ALG_IDS.get(alg_id)
            if name is None or name not in spec.algorithms:
                raise EventLogError(f"digest of algorithm 0x{alg_id:04x} not named by the Spec ID event", r.pos)
            if name in digests:
                raise EventLogError(f"two {name} digests in one event", r.pos)
            digests[name] = r.take(spec.algorithms[name], f"{name} digest")
        size = r.u32("eventSize")
        if size > MAX_EVENT_SIZE:
            raise EventLogError(f"event data of {size} bytes", r.pos)
        if pcr > 31:
            raise EventLogError(f"PCR index {pcr}", start)
        ev = Event(len(log.events), pcr, ev_type, digests, r.take(size, "event data"))
        if decode:
            _decode_into(ev, spec)
        log.events.append(ev)
        if len(log.events) > MAX_EVENTS:
            raise EventLogError("too many events", r.pos)
    return log


# --- replay --------------------------------------------------------------------------------------


def startup_locality(log: EventLog) -> int:
    """The H-CRTM/StartupLocality value from an EV_NO_ACTION event on PCR 0 (0 when absent)."""
    for ev in log.events[1:]:
        if ev.event_type == EV_NO_ACTION and ev.pcr == 0 and ev.data.startswith(_STARTUP_LOCALITY):
            if len(ev.data) >= len(_STARTUP_LOCALITY) + 1:
                return ev.data[len(_STARTUP_LOCALITY)]
    return 0


def replay(log: EventLog, bank: str, pcrs: Iterable[int] | None = None) -> dict[int, bytes]:
    """PCR values the log's events produce in ``bank`` (only PCRs with events, or those asked for)."""
    if bank not in log.spec_id.algorithms:
        raise EventLogError(f"bank {bank} is not in the event log", 0)
    size = log.spec_id.algorithms[bank]
    out: dict[int, bytes] = {}
    locality = startup_locality(log)
    for ev in log.events[1:]:
        if ev.event_type == EV_NO_ACTION:
            continue  # never extended (TCG PC Client spec)
        cur = out.get(ev.pcr)
        if cur is None:
            cur = bytes(size - 1) + bytes([locality]) if ev.pcr == 0 else bytes(size)
        out[ev.pcr] = hashlib.new(bank, cur + ev.digests[bank]).digest()
    if pcrs is not None:
        wanted = set(pcrs)
        out = {p: v for p, v in out.items() if p in wanted}
        for p in wanted - set(out):
            out[p] = bytes(size - 1) + bytes([locality]) if p == 0 and locality else bytes(size)
    return out


def mismatched_pcrs(log: EventLog, bank: str, quoted: dict[int, bytes], pcrs: Iterable[int]) -> list[int]:
    """PCRs (of ``pcrs`` that were quoted) whose quoted value differs from the log's replay."""
    replayed = replay(log, bank, [p for p in pcrs if p in quoted])
    return sorted(p for p, v in replayed.items() if quoted.get(p) != v)


# --- event data decoding -------------------------------------------------------------------------


def _utf16(raw: bytes) -> str:
    if len(raw) % 2:
        raise EventLogError("odd-length UTF-16 text", 0)
    return raw.decode("utf-16-le", "strict").rstrip("\x00")


def _ascii_z(raw: bytes) -> str:
    # grub and the firmware write NUL-terminated strings; keep what is before the first NUL
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def signature_lists(raw: bytes) -> list[dict[str, Any]]:
    """EFI_SIGNATURE_LIST* (PK, KEK, db, dbx): [{SignatureType, Keys: [{SignatureOwner, SignatureData}]}]."""
    r = _Reader(raw)
    out: list[dict[str, Any]] = []
    while r.remaining:
        start = r.pos
        sig_type = r.guid("SignatureType")
        list_size, header_size, sig_size = r.u32("SignatureListSize"), r.u32("SignatureHeaderSize"), r.u32("SignatureSize")
        if list_size < 28 + header_size or start + list_size > r.end or sig_size < 16:
            raise EventLogError("bad EFI_SIGNATURE_LIST sizes", start)
        r.take(header_size, "SignatureHeader")
        body = list_size - 28 - header_size
        if body % sig_size:
            raise EventLogError("EFI_SIGNATURE_LIST body is not a whole number of signatures", start)
        keys = []
        for _ in range(body // sig_size):
            owner = r.guid("SignatureOwner")
            keys.append({"SignatureOwner": owner, "SignatureData": r.take(sig_size - 16, "SignatureData").hex()})
        out.append({"SignatureType": sig_type, "SignatureListSize": list_size, "Keys": keys})
    return out


_DP_TYPES = {1: "Hardware", 2: "Acpi", 3: "Msg", 4: "Media", 5: "Bbs"}


def device_path_text(raw: bytes) -> str:
    """EFI device path as text for the simple nodes; other nodes as ``Type(sub,hex)``."""
    r = _Reader(raw)
    parts: list[str] = []
    while r.remaining >= 4:
        start = r.pos
        typ, sub, length = r.u8("node type"), r.u8("node subtype"), r.u16("node length")
        if length < 4 or start + length > r.end:
            raise EventLogError("bad device path node length", start)
        body = r.take(length - 4, "device path node")
        if typ == 0x7F:
            if sub == 0xFF:
                break
            parts.append(",")  # end of one instance
            continue
        parts.append(_dp_node(typ, sub, body))
    return "/".join(p for p in parts if p)


def _dp_node(typ: int, sub: int, body: bytes) -> str:
    if typ == 1 and sub == 1 and len(body) == 2:
        return f"Pci(0x{body[1]:x},0x{body[0]:x})"
    if typ == 2 and sub == 1 and len(body) == 8:
        hid, uid = struct.unpack("<II", body)
        if hid == 0x0A0341D0:
            return f"PciRoot(0x{uid:x})"
        return f"Acpi(0x{hid:08x},0x{uid:x})"
    if typ == 3 and sub == 18 and len(body) == 6:
        port, _mult, lun = struct.unpack("<HHH", body)
        return f"Sata(0x{port:x},0x{_mult:x},0x{lun:x})"
    if typ == 3 and sub == 23 and len(body) >= 4:
        return f"NVMe(0x{struct.unpack('<I', body[:4])[0]:x})"
    if typ == 4 and sub == 1 and len(body) == 38:
        num, start, size = struct.unpack("<IQQ", body[:20])
        sig = str(uuid.UUID(bytes_le=body[20:36])) if body[37] == 2 else body[20:36].hex()
        return f"HD({num},GPT,{sig},0x{start:x},0x{size:x})"
    if typ == 4 and sub == 4:
        return f"File({_utf16(body)})"
    if typ == 4 and sub == 6 and len(body) == 16:
        return f"FvFile({uuid.UUID(bytes_le=body)})"
    if typ == 4 and sub == 7 and len(body) == 16:
        return f"FvVol({uuid.UUID(bytes_le=body)})"
    return f"{_DP_TYPES.get(typ, 'Path')}({typ},{sub},{body.hex()})"


def load_option(raw: bytes) -> dict[str, Any]:
    """EFI_LOAD_OPTION (Boot####): attributes, description, device path text, optional data."""
    r = _Reader(raw)
    attrs = r.u32("Attributes")
    dp_len = r.u16("FilePathListLength")
    desc = bytearray()
    while True:
        ch = r.take(2, "Description")
        if ch == b"\x00\x00":
            break
        desc += ch
    dp = r.take(dp_len, "FilePathList")
    return {
        "Enabled": "Yes" if attrs & 1 else "No",
        "FilePathListLength": dp_len,
        "Description": _utf16(bytes(desc)),
        "DevicePath": device_path_text(dp),
        "OptionalData": r.take(r.remaining, "OptionalData").hex(),
    }


def variable_data(raw: bytes) -> dict[str, Any]:
    """UEFI_VARIABLE_DATA: VariableName GUID, UnicodeName, raw VariableData (hex) + decoded form."""
    r = _Reader(raw)
    guid = r.guid("VariableName")
    name_len = r.u64("UnicodeNameLength")
    data_len = r.u64("VariableDataLength")
    if name_len > 4096 or data_len > MAX_EVENT_SIZE:
        raise EventLogError("UEFI variable sizes out of range", 0)
    name = _utf16(r.take(2 * name_len, "UnicodeName"))
    value = r.take(data_len, "VariableData")
    return {"VariableName": guid, "UnicodeName": name, "VariableData": value}


def _decode_variable(ev: Event) -> dict[str, Any]:
    var = variable_data(ev.data)
    name, value = var["UnicodeName"], var["VariableData"]
    out: dict[str, Any] = {"VariableName": var["VariableName"], "UnicodeName": name,
                           "VariableDataLength": len(value)}
    if name in ("SecureBoot", "MokListTrusted") and len(value) <= 1:
        out["VariableData"] = {"Enabled": "Yes" if value and value[0] else "No"}
    elif name in ("PK", "KEK", "db", "dbx", "vendor_db", "MokList", "MokListX") and ev.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG:
        out["VariableData"] = signature_lists(value)
    elif ev.event_type == EV_EFI_VARIABLE_AUTHORITY and name in ("db", "vendor_db", "MokList") and len(value) > 16:
        # shim/firmware log the one EFI_SIGNATURE_DATA that authorised an image
        out["VariableData"] = [{"SignatureOwner": str(uuid.UUID(bytes_le=value[:16])),
                                "SignatureData": value[16:].hex()}]
    elif name == "BootOrder":
        if len(value) % 2:
            raise EventLogError("odd-length BootOrder", 0)
        out["VariableData"] = [f"Boot{n:04X}" for n in struct.unpack(f"<{len(value) // 2}H", value)]
    elif ev.event_type in (EV_EFI_VARIABLE_BOOT, EV_EFI_VARIABLE_BOOT2) and name.startswith("Boot"):
        out["VariableData"] = load_option(value)
    else:
        out["VariableData"] = value.hex()
    return out


def _decode_image_load(ev: Event) -> dict[str, Any]:
    r = _Reader(ev.data)
    location, length, link = r.u64("ImageLocationInMemory"), r.u64("ImageLengthInMemory"), r.u64("ImageLinkTime")
    dp_len = r.u64("LengthOfDevicePath")
    dp = r.take(dp_len, "DevicePath")
    return {"ImageLocationInMemory": location, "ImageLengthInMemory": length,
            "ImageLinkTimeAddress": link, "LengthOfDevicePath": dp_len, "DevicePath": device_path_text(dp)}


def _decode_blob(ev: Event) -> dict[str, Any]:
    r = _Reader(ev.data)
    out: dict[str, Any] = {}
    if ev.event_type == EV_EFI_PLATFORM_FIRMWARE_BLOB2:
        out["BlobDescription"] = _ascii_z(r.take(r.u8("BlobDescriptionSize"), "BlobDescription"))
    out["BlobBase"] = r.u64("BlobBase")
    out["BlobLength"] = r.u64("BlobLength")
    return out


def _decode_handoff(ev: Event) -> dict[str, Any]:
    r = _Reader(ev.data)
    out: dict[str, Any] = {}
    if ev.event_type == EV_EFI_HANDOFF_TABLES2:
        out["TableDescription"] = _ascii_z(r.take(r.u8("TableDescriptionSize"), "TableDescription"))
    count = r.u64("NumberOfTables")
    if count * 24 > r.remaining:
        raise EventLogError("handoff table count exceeds the event", 0)
    out["Tables"] = [{"VendorGuid": r.guid("VendorGuid"), "VendorTable": r.u64("VendorTable")} for _ in range(count)]
    return out


def _decode_gpt(ev: Event) -> dict[str, Any]:
    r = _Reader(ev.data)
    header = r.take(92, "GPT header")
    if header[:8] != b"EFI PART":
        raise EventLogError("GPT header signature", 0)
    count = r.u64("NumberOfPartitions")
    entry_size = struct.unpack("<I", header[84:88])[0]
    if entry_size < 128 or count * entry_size > r.remaining:
        raise EventLogError("GPT partition entries exceed the event", 0)
    parts = []
    for _ in range(count):
        ent = r.take(entry_size, "GPT partition entry")
        parts.append({"PartitionTypeGUID": str(uuid.UUID(bytes_le=ent[:16])),
                      "UniquePartitionGUID": str(uuid.UUID(bytes_le=ent[16:32])),
                      "PartitionName": _utf16(ent[56:128])})
    return {"DiskGUID": str(uuid.UUID(bytes_le=header[56:72])), "NumberOfPartitions": count, "Partitions": parts}


def _decode_string(ev: Event) -> dict[str, Any]:
    return {"String": _ascii_z(ev.data)}


def _decode_crtm_version(ev: Event) -> Any:
    # usually a UTF-16 string; some firmware writes a GUID or raw bytes
    try:
        return {"String": _utf16(ev.data)}
    except (UnicodeDecodeError, EventLogError):
        return ev.data.hex()


def _decode_separator(ev: Event) -> Any:
    return ev.data.hex().upper() if len(ev.data) == 4 else ev.data.hex()


def _decode_no_action(ev: Event) -> Any:
    if ev.data.startswith(_STARTUP_LOCALITY) and len(ev.data) > len(_STARTUP_LOCALITY):
        return {"StartupLocality": ev.data[len(_STARTUP_LOCALITY)]}
    return ev.data.hex()


_DECODERS: dict[int, Callable[[Event], Any]] = {
    EV_EFI_VARIABLE_DRIVER_CONFIG: _decode_variable,
    EV_EFI_VARIABLE_BOOT: _decode_variable,
    EV_EFI_VARIABLE_BOOT2: _decode_variable,
    EV_EFI_VARIABLE_AUTHORITY: _decode_variable,
    EV_EFI_BOOT_SERVICES_APPLICATION: _decode_image_load,
    EV_EFI_BOOT_SERVICES_DRIVER: _decode_image_load,
    EV_EFI_RUNTIME_SERVICES_DRIVER: _decode_image_load,
    EV_EFI_PLATFORM_FIRMWARE_BLOB: _decode_blob,
    EV_EFI_PLATFORM_FIRMWARE_BLOB2: _decode_blob,
    EV_EFI_HANDOFF_TABLES: _decode_handoff,
    EV_EFI_HANDOFF_TABLES2: _decode_handoff,
    EV_EFI_GPT_EVENT: _decode_gpt,
    EV_IPL: _decode_string,
    EV_EFI_ACTION: _decode_string,
    EV_ACTION: _decode_string,
    EV_POST_CODE: _decode_string,
    EV_S_CRTM_VERSION: _decode_crtm_version,
    EV_SEPARATOR: _decode_separator,
    EV_NO_ACTION: _decode_no_action,
}


def _decode_into(ev: Event, spec: SpecId) -> None:
    decoder = _DECODERS.get(ev.event_type)
    if decoder is None:
        return
    try:
        ev.decoded = decoder(ev)
    except (EventLogError, UnicodeDecodeError, struct.error, ValueError) as exc:
        ev.decode_error = str(exc)
