"""Event data of a TCG event log: decoded where measured-boot policies need it (UEFI variables
with GUIDs and signature lists, boot variables, image-load device paths, EV_IPL strings, ...),
and checked against the event's own digests where those are defined over it.

Data that does not decode is kept raw with ``decode_error`` set (:func:`decode_into`), because
real firmware writes odd data and the digests still replay.

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
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

from keytrio.protocol.eventlog import (
    EV_ACTION,
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_BOOT_SERVICES_DRIVER,
    EV_EFI_GPT_EVENT,
    EV_EFI_HANDOFF_TABLES,
    EV_EFI_HANDOFF_TABLES2,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_EFI_PLATFORM_FIRMWARE_BLOB2,
    EV_EFI_RUNTIME_SERVICES_DRIVER,
    EV_EFI_VARIABLE_AUTHORITY,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_BOOT2,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_NO_ACTION,
    EV_NONHOST_INFO,
    EV_OMIT_BOOT_DEVICE_EVENTS,
    EV_PLATFORM_CONFIG_FLAGS,
    EV_POST_CODE,
    EV_S_CRTM_VERSION,
    EV_SEPARATOR,
    EV_TABLE_OF_DEVICES,
    FORMAT_CRYPTO_AGILE,
    FORMAT_SHA1,
    LOG_DIGEST_SIZES,
    MAX_EVENT_SIZE,
    STARTUP_LOCALITY,
    ByteReader,
    Event,
    EventLog,
    EventLogError,
    hash_data,
)

# --- decoders ------------------------------------------------------------------------------------


def _utf16(raw: bytes) -> str:
    if len(raw) % 2:
        raise EventLogError("odd-length UTF-16 text", 0)
    return raw.decode("utf-16-le", "strict").rstrip("\x00")


def _ascii_z(raw: bytes) -> str:
    # grub and the firmware write NUL-terminated strings; keep what is before the first NUL
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def signature_lists(raw: bytes) -> list[dict[str, Any]]:
    """EFI_SIGNATURE_LIST* (PK, KEK, db, dbx): [{SignatureType, Keys: [{SignatureOwner, SignatureData}]}]."""
    r = ByteReader(raw)
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
    r = ByteReader(raw)
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
    r = ByteReader(raw)
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
    r = ByteReader(raw)
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
    r = ByteReader(ev.data)
    location, length, link = r.u64("ImageLocationInMemory"), r.u64("ImageLengthInMemory"), r.u64("ImageLinkTime")
    dp_len = r.u64("LengthOfDevicePath")
    dp = r.take(dp_len, "DevicePath")
    return {"ImageLocationInMemory": location, "ImageLengthInMemory": length,
            "ImageLinkTimeAddress": link, "LengthOfDevicePath": dp_len, "DevicePath": device_path_text(dp)}


def _decode_blob(ev: Event) -> dict[str, Any]:
    r = ByteReader(ev.data)
    out: dict[str, Any] = {}
    if ev.event_type == EV_EFI_PLATFORM_FIRMWARE_BLOB2:
        out["BlobDescription"] = _ascii_z(r.take(r.u8("BlobDescriptionSize"), "BlobDescription"))
    out["BlobBase"] = r.u64("BlobBase")
    out["BlobLength"] = r.u64("BlobLength")
    return out


def _decode_handoff(ev: Event) -> dict[str, Any]:
    r = ByteReader(ev.data)
    out: dict[str, Any] = {}
    if ev.event_type == EV_EFI_HANDOFF_TABLES2:
        out["TableDescription"] = _ascii_z(r.take(r.u8("TableDescriptionSize"), "TableDescription"))
    count = r.u64("NumberOfTables")
    if count * 24 > r.remaining:
        raise EventLogError("handoff table count exceeds the event", 0)
    out["Tables"] = [{"VendorGuid": r.guid("VendorGuid"), "VendorTable": r.u64("VendorTable")} for _ in range(count)]
    return out


def _decode_gpt(ev: Event) -> dict[str, Any]:
    r = ByteReader(ev.data)
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
    if ev.data.startswith(STARTUP_LOCALITY) and len(ev.data) > len(STARTUP_LOCALITY):
        return {"StartupLocality": ev.data[len(STARTUP_LOCALITY)]}
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


def decode_into(ev: Event) -> None:
    """Set ``ev.decoded`` for the types with a decoder, or ``ev.decode_error`` when it fails."""
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
        if bank not in LOG_DIGEST_SIZES:
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
