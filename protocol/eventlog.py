"""TCG PC Client UEFI event logs: parse, decode event data, check data against digests, replay.

Two layouts exist, and real TPM 2.0 machines write both:

* **crypto-agile**: a first TCG_PCR_EVENT (SHA-1 layout) that is the EV_NO_ACTION "Spec ID Event03"
  naming the banks and their digest sizes, then TCG_PCR_EVENT2 records (a digest list each);
* **SHA-1** ("TCG 1.2 style", TCG_PCR_EVENT only: PCR, type, one SHA-1 digest, data): what the
  firmware of many TPM 2.0 machines still writes (and every TPM 1.2 machine). Any log whose first
  event is not a Spec ID Event03 is read in this layout, like go-attestation and tpm2-tools do.

:func:`parse` gives an :class:`EventLog`; structural damage (truncation, an algorithm the Spec ID
event does not name, absurd sizes, trailing bytes that are no event) raises :class:`EventLogError`
(a :class:`~protocol.errors.DecodeError`) naming the byte offset. Event *data* is decoded where
measured-boot policies need it (UEFI variables with GUIDs and signature lists, boot variables,
image-load device paths, EV_IPL strings, ...); data that does not decode is kept raw with
``decode_error`` set, because real firmware writes odd data and the digests still replay.

**Events with fewer digests than the Spec ID event names.** The PC Client Platform Firmware Profile
wants one digest per active bank in every event, but real and test logs carry fewer
(tpm2-tools' event-uefivar/uefiaction fixtures). tpm2-tools and go-attestation read such events
(each digest's size comes from the Spec ID event); so does :func:`parse`. What the missing digest
would have been is unknowable, so a PCR that such an event extends has no value in that bank:
:func:`replay` raises :class:`EventLogError` naming the event when asked for it (go-attestation's
replay fails the same way; tpm2-tools prints a value no TPM holds), and :func:`incomplete_pcrs`
says which PCRs are affected. Two digests of one algorithm, or one the Spec ID event does not name,
are structural errors. Algorithms the Spec ID event names but keytrio cannot hash (an unknown id)
still parse; replaying that bank raises :class:`EventLogError`. sm3_256 replays (hashlib or
``cryptography``'s SM3).

**Event data bound to its digest.** The digest of some event types is defined over the event data
itself (:func:`data_mismatch`): then data that does not hash to the digests was edited after the
measurement and must not be believed (the replay cannot notice: it only uses the digests). Other
digests are over something else (a PE image's Authenticode hash, a file grub read, a firmware
volume, the MokList variable content) and such events are judged by digest only; their data is a
hint. Quirks of real firmware are accepted where they are documented: EV_EFI_VARIABLE_BOOT digests
either the whole UEFI_VARIABLE_DATA or only its VariableData (EDK2 hashes VariableData only, which
is what the PC Client spec says for this type; others hash all of it, both occur in real logs),
and the TPM 1.2-era firmware of SHA-1-format logs hashed only VariableData for
EV_EFI_VARIABLE_DRIVER_CONFIG too (go-attestation's linux_tpm12 log; there the variable's name
and GUID are not covered, only its value);
EV_EFI_VARIABLE_AUTHORITY from shims without rhboot/shim commit 8a27a48 carries one byte more
than they hashed (go-attestation issue 157); grub's EV_IPL "grub_cmd: X" / "kernel_cmdline: X"
strings on PCR 8 digest X (without the prefix and the NUL).

:func:`replay` folds the events into PCR values for one bank (EV_NO_ACTION never extends; the
StartupLocality EV_NO_ACTION event sets PCR 0's initial value, as the PC Client spec says; PCRs
17-22 start as all ones, as after every TPM2_Startup without a D-RTM launch).
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

ALG_IDS = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512", 0x0012: "sm3_256",
           0x0027: "sha3_256", 0x0028: "sha3_384", 0x0029: "sha3_512"}  # fmt: skip
ALG_BY_NAME = {v: k for k, v in ALG_IDS.items()}
DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32,
                "sha3_256": 32, "sha3_384": 48, "sha3_512": 64}  # fmt: skip
_MAX_DIGEST = 128  # an unknown algorithm's digest size from the Spec ID event is believed up to this


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
    if bank not in DIGEST_SIZES:
        raise EventLogError(f"no implementation of the {bank} hash algorithm", 0)
    return hashlib.new(bank, data).digest()


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
FORMAT_CRYPTO_AGILE = "crypto-agile"
FORMAT_SHA1 = "sha1"
_DRTM_PCRS = range(17, 23)  # reset to all ones at TPM2_Startup (PC Client PCR usage)


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


def _parse_spec_id(data: bytes, start: int, end: int) -> SpecId:
    """TCG_EfiSpecIDEventStruct at data[start:end] (offsets in errors are the log's)."""
    r = _Reader(data, start, end)

    def err(message: str, at: int | None = None) -> EventLogError:
        return EventLogError(f"Spec ID event: {message}", r.pos if at is None else at)

    r.take(16, "Spec ID signature")
    platform_class = r.u32("Spec ID platformClass")
    minor, major, errata, uintn = r.take(4, "Spec ID version")
    count = r.u32("Spec ID numberOfAlgorithms")
    if not 1 <= count <= 16:
        raise err(f"names {count} algorithms", r.pos - 4)
    algs: dict[str, int] = {}
    for _ in range(count):
        at = r.pos
        alg_id, size = r.u16("Spec ID algorithmId"), r.u16("Spec ID digestSize")
        name = alg_name(alg_id)
        if (name in DIGEST_SIZES and size != DIGEST_SIZES[name]) or not 1 <= size <= _MAX_DIGEST:
            raise err(f"{name} digest size {size}", at)
        if name in algs:
            raise err(f"names {name} twice", at)
        algs[name] = size
    vendor_size = r.u8("Spec ID vendorInfoSize")
    if vendor_size != r.remaining:
        # go-attestation refuses this too; tpm2-tools reads the vendor info past the event's end
        raise err(f"vendorInfoSize {vendor_size} but {r.remaining} bytes are left in the event", r.pos - 1)
    vendor = r.take(vendor_size, "Spec ID vendorInfo")
    return SpecId(platform_class, (major, minor, errata), uintn, algs, vendor)


def _sha1_event(r: _Reader, number: int) -> Event:
    """One TCG_PCR_EVENT (PCR, type, SHA-1 digest, data)."""
    start = r.pos
    pcr = r.u32("pcrIndex")
    ev_type = r.u32("eventType")
    digest = r.take(20, "SHA-1 digest")
    size = r.u32("eventSize")
    if size > MAX_EVENT_SIZE:
        raise EventLogError(f"event {number}: event data of {size} bytes", r.pos - 4)
    if pcr == ev_type == size == 0:
        # the Linux kernel stops a TPM 1.2 log at such an event: it is padding, not a measurement
        raise EventLogError(f"event {number} is an empty EV_PREBOOT_CERT (end-of-log padding)", start)
    data = r.take(size, f"event {number} data ({size} bytes)")
    return Event(number, pcr, ev_type, {"sha1": digest}, data, offset=start)


def _agile_event(r: _Reader, number: int, algs: dict[str, int]) -> Event:
    """One TCG_PCR_EVENT2 (PCR, type, digest list, data)."""
    start = r.pos
    pcr = r.u32("pcrIndex")
    ev_type = r.u32("eventType")
    count = r.u32("digest count")
    if count > len(algs):
        raise EventLogError(f"event {number} has {count} digests, the Spec ID event names {len(algs)}", start + 8)
    digests: dict[str, bytes] = {}
    for _ in range(count):
        at = r.pos
        name = alg_name(r.u16("algorithmId"))
        if name not in algs:
            raise EventLogError(f"event {number}: digest of algorithm {name} not named by the Spec ID event", at)
        if name in digests:
            raise EventLogError(f"event {number}: two {name} digests", at)
        digests[name] = r.take(algs[name], f"{name} digest")
    size = r.u32("eventSize")
    if size > MAX_EVENT_SIZE:
        raise EventLogError(f"event {number}: event data of {size} bytes", r.pos - 4)
    data = r.take(size, f"event {number} data ({size} bytes)")
    return Event(number, pcr, ev_type, digests, data, offset=start)


def parse(data: bytes, *, decode: bool = True) -> EventLog:
    """Parse a binary event log (``binary_bios_measurements``), crypto-agile or SHA-1 format."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventLogError("event log must be bytes", 0)
    data = bytes(data)
    if not data:
        raise EventLogError("empty event log", 0)
    r = _Reader(data)
    first = _sha1_event(r, 0)
    spec: SpecId | None = None
    if first.event_type == EV_NO_ACTION and first.data.startswith(_SPEC_ID_SIGNATURE):
        spec = _parse_spec_id(data, first.offset + 32, first.offset + 32 + len(first.data))
        first.decoded = {"SpecID": {"algorithms": dict(spec.algorithms), "uintnSize": spec.uintn_size,
                                    "platformClass": spec.platform_class,
                                    "vendorInfo": spec.vendor_info.hex()}}  # fmt: skip
    log = EventLog(spec, [first])
    if spec is None and decode:
        _decode_into(first)
    _check_pcr(first)
    while r.remaining:
        number = len(log.events)
        ev = _sha1_event(r, number) if spec is None else _agile_event(r, number, spec.algorithms)
        _check_pcr(ev)
        if decode:
            _decode_into(ev)
        log.events.append(ev)
        if len(log.events) > MAX_EVENTS:
            raise EventLogError("too many events", r.pos)
    return log


def _check_pcr(ev: Event) -> None:
    # EV_NO_ACTION is never extended, and Windows writes some with PCR index 0xffffffff
    if ev.pcr > 31 and ev.event_type != EV_NO_ACTION:
        raise EventLogError(f"event {ev.number}: PCR index {ev.pcr}", ev.offset)


# --- replay --------------------------------------------------------------------------------------


def startup_locality(log: EventLog) -> int:
    """The H-CRTM/StartupLocality value from an EV_NO_ACTION event on PCR 0 (0 when absent)."""
    for ev in log.events:
        if ev.event_type == EV_NO_ACTION and ev.pcr == 0 and ev.data.startswith(_STARTUP_LOCALITY):
            if len(ev.data) >= len(_STARTUP_LOCALITY) + 1:
                return ev.data[len(_STARTUP_LOCALITY)]
    return 0


def initial_value(pcr: int, size: int, locality: int = 0) -> bytes:
    """A PCR's value before the first extend."""
    if pcr in _DRTM_PCRS:
        return b"\xff" * size
    if pcr == 0 and locality:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


def incomplete_pcrs(log: EventLog, bank: str) -> dict[int, Event]:
    """PCR -> the first event extending it without a ``bank`` digest (its value in ``bank`` is unknown)."""
    out: dict[int, Event] = {}
    for ev in log.events:
        if ev.event_type != EV_NO_ACTION and bank not in ev.digests and ev.pcr not in out:
            out[ev.pcr] = ev
    return out


def replay(log: EventLog, bank: str, pcrs: Iterable[int] | None = None) -> dict[int, bytes]:
    """PCR values the log's events produce in ``bank`` (only PCRs with events, or those asked for).

    EventLogError when the log has no such bank, keytrio cannot hash it, or an event extending one
    of the PCRs carries no digest of this bank (see the module text)."""
    if bank not in log.algorithms:
        raise EventLogError(f"bank {bank} is not in the event log", 0)
    size = log.algorithms[bank]
    wanted = None if pcrs is None else set(pcrs)
    for pcr, ev in sorted(incomplete_pcrs(log, bank).items()):
        if wanted is None or pcr in wanted:
            raise EventLogError(f"PCR {pcr} has no {bank} value: {ev.where()} carries no {bank} digest", ev.offset)
    extend = _extender(bank)
    out: dict[int, bytes] = {}
    locality = startup_locality(log)
    for ev in log.events:
        if ev.event_type == EV_NO_ACTION or (wanted is not None and ev.pcr not in wanted):
            continue  # EV_NO_ACTION is never extended (TCG PC Client spec)
        cur = out.get(ev.pcr)
        if cur is None:
            cur = initial_value(ev.pcr, size, locality)
        out[ev.pcr] = extend(cur + ev.digests[bank])
    if wanted is not None:
        for p in wanted - set(out):
            out[p] = initial_value(p, size, locality)
    return out


def _extender(bank: str) -> Callable[[bytes], bytes]:
    if bank in DIGEST_SIZES and bank != "sm3_256":
        return lambda b: hashlib.new(bank, b).digest()
    return lambda b: hash_data(bank, b)


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


def _decode_into(ev: Event) -> None:
    decoder = _DECODERS.get(ev.event_type)
    if decoder is None:
        return
    try:
        ev.decoded = decoder(ev)
    except (EventLogError, UnicodeDecodeError, struct.error, ValueError) as exc:
        ev.decode_error = str(exc)


# --- event data bound to its digest --------------------------------------------------------------

#: types whose digest the PC Client Platform Firmware Profile defines over the event data itself
_DATA_DIGEST_TYPES = frozenset([
    EV_SEPARATOR, EV_ACTION, EV_EFI_ACTION, EV_S_CRTM_VERSION, EV_PLATFORM_CONFIG_FLAGS,
    EV_TABLE_OF_DEVICES, EV_NONHOST_INFO, EV_OMIT_BOOT_DEVICE_EVENTS,
    EV_EFI_VARIABLE_DRIVER_CONFIG, EV_EFI_VARIABLE_BOOT, EV_EFI_VARIABLE_BOOT2,
    EV_EFI_VARIABLE_AUTHORITY, EV_EFI_GPT_EVENT,
])  # fmt: skip
_GRUB_PREFIXES = (b"grub_cmd: ", b"kernel_cmdline: ", b"module_cmdline: ")
BOUND, NOT_BOUND, MISMATCH = "bound", "digest-only", "mismatch"


def measured_bytes(ev: Event, log_format: str = FORMAT_CRYPTO_AGILE) -> list[bytes] | None:
    """What the digests of ``ev`` may be over, per the spec and the documented firmware quirks
    (see the module text); None when the digest is not over the event's data."""
    t, data = ev.event_type, ev.data
    if t == EV_IPL and ev.pcr == 8 and data.startswith(_GRUB_PREFIXES):
        return [data.split(b": ", 1)[1].rstrip(b"\x00")]  # grub hashes the text after the prefix
    if t not in _DATA_DIGEST_TYPES:
        return None
    out = [data]
    if t == EV_EFI_VARIABLE_BOOT or (t == EV_EFI_VARIABLE_DRIVER_CONFIG and log_format == FORMAT_SHA1):
        try:
            out.append(variable_data(data)["VariableData"])
        except (EventLogError, UnicodeDecodeError):
            pass
    elif t == EV_EFI_VARIABLE_AUTHORITY and data:
        out.append(data[:-1])
    return out


def data_mismatch(ev: Event, log_format: str = FORMAT_CRYPTO_AGILE) -> str | None:
    """Why the data of ``ev`` is not what its digests measured (None: it is, or they measured
    something else). Every digest keytrio can compute must match; a log whose only digests are
    of unknown algorithms cannot vouch for its data."""
    candidates = measured_bytes(ev, log_format)
    if candidates is None:
        return None
    checked = False
    for bank, digest in ev.digests.items():
        if bank not in DIGEST_SIZES:
            continue
        checked = True
        if not any(hash_data(bank, c) == digest for c in candidates):
            return f"{ev.where()}: its data does not hash to its {bank} digest"
    return None if checked else f"{ev.where()}: no digest keytrio can compute vouches for its data"


def data_binding(ev: Event, log_format: str = FORMAT_CRYPTO_AGILE) -> str:
    """BOUND (data hashes to the digests), NOT_BOUND (digest is over something else), MISMATCH."""
    if ev.event_type == EV_NO_ACTION or measured_bytes(ev, log_format) is None:
        return NOT_BOUND
    return MISMATCH if data_mismatch(ev, log_format) else BOUND


def unbound_events(log: EventLog) -> list[tuple[Event, str]]:
    """Events whose data was edited after the measurement, with the reason (empty: none)."""
    out = []
    for ev in log.events:
        if ev.event_type != EV_NO_ACTION:
            reason = data_mismatch(ev, log.format)
            if reason is not None:
                out.append((ev, reason))
    return out
