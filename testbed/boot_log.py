"""Synthetic UEFI boot event logs (TCG PC Client crypto-agile format) for simulated machines.

A log looks like an OVMF + shim + grub + Linux boot: S-CRTM version and a firmware blob (PCR 0),
the Secure Boot variables SecureBoot/PK/KEK/db/dbx (PCR 7, EV_EFI_VARIABLE_DRIVER_CONFIG),
BootOrder/Boot0001 (PCR 1), separators, the GPT (PCR 5), shim -> grub -> kernel as
EV_EFI_BOOT_SERVICES_APPLICATION (PCR 4, digests stand in for Authenticode hashes), shim's
MokList events (PCR 14), the db/Shim authorities that verified each image (PCR 7,
EV_EFI_VARIABLE_AUTHORITY), grub's commands and kernel command line (PCR 8, EV_IPL) and the files
it read - grub.cfg, vmlinuz, initrd (PCR 9, EV_IPL), and ExitBootServices (PCR 5).

:class:`BootConfig` describes one rich boot (``BootConfig()`` is the good one); its tamper knobs make the boots a measured-boot policy
must refuse: ``secure_boot=False``, ``kernel`` (another kernel image), ``dbx_drop`` (a dbx entry
missing), ``extra_application`` (one more boot application). :func:`events` gives the PCR extends
the boot performs and :func:`build` the matching binary log, so log and PCRs always agree.
Without a config both give the minimal log (Spec ID + one separator per PCR 0-7), which is what
testbed/machine.py boots unless it is handed a BootConfig.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_S_CRTM_VERSION = 0x00000008
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

_ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_SEPARATOR_DATA = b"\x00\x00\x00\x00"

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIM_LOCK_GUID = uuid.UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
MICROSOFT_OWNER = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b")
VENDOR_OWNER = uuid.UUID("0b1c5c3e-1fb2-4e53-8b2f-6b6579747269")  # "keytrio" vendor (made up)


def _cert(name: str) -> bytes:
    """A stand-in DER certificate body (deterministic; only its bytes matter to the log)."""
    return b"\x30\x82\x01\x00" + hashlib.sha512(f"keytrio test cert {name}".encode()).digest() * 4


def _dbx_hash(i: int) -> bytes:
    return hashlib.sha256(f"revoked image {i}".encode()).digest()


@dataclass(frozen=True)
class BootConfig:
    """One boot's inputs. The defaults are the good boot; see the module docstring for knobs."""

    secure_boot: bool = True
    firmware: bytes = b"OVMF keytrio firmware volume 1.0"
    crtm_version: str = "1.00"
    pk: tuple[bytes, ...] = (_cert("PK"),)
    kek: tuple[bytes, ...] = (_cert("KEK"),)
    db: tuple[bytes, ...] = (_cert("db-windows"), _cert("db-uefi-ca"))
    dbx: tuple[bytes, ...] = tuple(_dbx_hash(i) for i in range(4))
    shim: bytes = b"shimx64.efi 15.7"
    grub: bytes = b"grubx64.efi 2.06"
    kernel: bytes = b"vmlinuz-6.1.0-keytrio"
    initrd: bytes = b"initrd.img-6.1.0-keytrio"
    kernel_version: str = "6.1.0-keytrio"
    cmdline: str = "root=UUID=7b8c1c5e-1f41-4a5e-9d36-5bb3b3a4f0a1 ro quiet"
    extra_application: bytes | None = None  # tamper: one more EV_EFI_BOOT_SERVICES_APPLICATION
    mok: tuple[bytes, ...] = field(default=())

    def tampered(self, knob: str) -> BootConfig:
        """The good boot with one named tamper knob applied (the scenarios' vocabulary)."""
        if knob == "secure_boot_off":
            return replace(self, secure_boot=False)
        if knob == "unknown_kernel":
            return replace(self, kernel=b"vmlinuz-6.1.0-evil")
        if knob == "dbx_missing_entry":
            return replace(self, dbx=self.dbx[1:])
        if knob == "extra_application":
            return replace(self, extra_application=b"bootkit.efi")
        raise ValueError(f"unknown tamper knob {knob!r}")


TAMPER_KNOBS = ("secure_boot_off", "unknown_kernel", "dbx_missing_entry", "extra_application")

# --- encoders ------------------------------------------------------------------------------------


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def variable_data(guid: uuid.UUID, name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA: GUID, UnicodeNameLength, VariableDataLength, name (UTF-16, no NUL), data."""
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + _utf16(name) + value


def signature_list(sig_type: uuid.UUID, owner: uuid.UUID, items: Sequence[bytes]) -> bytes:
    """One EFI_SIGNATURE_LIST of equally sized items (empty bytes for no items)."""
    if not items:
        return b""
    size = 16 + len(items[0])
    if any(16 + len(i) != size for i in items):
        raise ValueError("one signature list holds items of one size")
    body = b"".join(owner.bytes_le + i for i in items)
    return sig_type.bytes_le + struct.pack("<III", 28 + len(body), 0, size) + body


def _x509_lists(certs: Sequence[bytes], owner: uuid.UUID) -> bytes:
    # certificates differ in size: one list per certificate, as firmware stores them
    return b"".join(signature_list(EFI_CERT_X509_GUID, owner, [c]) for c in certs)


def device_path(*nodes: bytes) -> bytes:
    return b"".join(nodes) + b"\x7f\xff\x04\x00"


def _dp_node(typ: int, sub: int, body: bytes) -> bytes:
    return struct.pack("<BBH", typ, sub, 4 + len(body)) + body


def _disk_path(file_path: str | None) -> bytes:
    nodes = [
        _dp_node(2, 1, struct.pack("<II", 0x0A0341D0, 0)),  # PciRoot(0x0)
        _dp_node(1, 1, bytes([1, 4])),  # Pci(0x4,0x1)
        _dp_node(4, 1, struct.pack("<IQQ", 1, 2048, 204800)
                 + uuid.UUID("8f1b7c16-5d5e-4b0f-9a44-1d0c2f6e3a21").bytes_le + bytes([2, 2])),
    ]  # fmt: skip
    if file_path is not None:
        nodes.append(_dp_node(4, 4, _utf16(file_path + "\x00")))
    return device_path(*nodes)


def _image_load(length: int, path: str) -> bytes:
    dp = _disk_path(path)
    return struct.pack("<QQQQ", 0x7E000000, length, 0, len(dp)) + dp


def _load_option(description: str, path: str) -> bytes:
    dp = _disk_path(path)
    return struct.pack("<IH", 1, len(dp)) + _utf16(description + "\x00") + dp


def _gpt() -> bytes:
    entry = (uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").bytes_le
             + uuid.UUID("8f1b7c16-5d5e-4b0f-9a44-1d0c2f6e3a21").bytes_le
             + struct.pack("<QQQ", 2048, 206847, 0) + _utf16("EFI System Partition").ljust(72, b"\x00"))  # fmt: skip
    header = (b"EFI PART" + struct.pack("<IIII", 0x00010000, 92, 0, 0) + struct.pack("<QQQQ", 1, 41943039, 34, 41943006)
              + uuid.UUID("5d0b6b1c-3c2a-4b8e-8f1e-6b6579747269").bytes_le
              + struct.pack("<QIII", 2, 128, 128, 0))  # fmt: skip
    return header + struct.pack("<Q", 1) + entry


def authenticode(image: bytes, bank: str) -> bytes:
    """Stand-in for an image's Authenticode hash in ``bank`` (what firmware/shim measure in PCR 4)."""
    return hashlib.new(bank, b"authenticode\x00" + image).digest()


# --- the boot ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    """One event to log and (unless EV_NO_ACTION) extend: ``measured`` is hashed per bank, or
    ``digest_fn`` gives the digest per bank (Authenticode)."""

    pcr: int
    event_type: int
    data: bytes
    measured: bytes | None = None  # None: the event data itself is what is hashed
    image: bytes | None = None  # Authenticode-measured image

    def digest(self, bank: str) -> bytes:
        if self.event_type == EV_NO_ACTION:
            return bytes(_SIZES[bank])
        if self.image is not None:
            return authenticode(self.image, bank)
        return hashlib.new(bank, self.data if self.measured is None else self.measured).digest()


def minimal_events() -> list[LogEvent]:
    """The foundation only: one EV_SEPARATOR per PCR 0-7 (what a machine boots by default)."""
    return [LogEvent(pcr, EV_SEPARATOR, _SEPARATOR_DATA) for pcr in range(8)]


def boot_events(config: BootConfig | None = None) -> list[LogEvent]:
    """The events of one boot, in log order (without the Spec ID header); None = minimal log."""
    if config is None:
        return minimal_events()
    c = config
    ev: list[LogEvent] = []

    def var(pcr: int, etype: int, guid: uuid.UUID, name: str, value: bytes, measured: bytes | None = None) -> None:
        data = variable_data(guid, name, value)
        ev.append(LogEvent(pcr, etype, data, measured))

    crtm = _utf16(c.crtm_version + "\x00")
    ev.append(LogEvent(0, EV_S_CRTM_VERSION, crtm))
    ev.append(LogEvent(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0xFFC00000, len(c.firmware)),
                       measured=c.firmware))
    var(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01" if c.secure_boot else b"\x00")
    var(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL_VARIABLE, "PK", _x509_lists(c.pk, VENDOR_OWNER))
    var(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL_VARIABLE, "KEK", _x509_lists(c.kek, MICROSOFT_OWNER))
    var(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_IMAGE_SECURITY_DATABASE, "db", _x509_lists(c.db, MICROSOFT_OWNER))
    var(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_IMAGE_SECURITY_DATABASE, "dbx",
        signature_list(EFI_CERT_SHA256_GUID, MICROSOFT_OWNER, list(c.dbx)))
    ev.append(LogEvent(7, EV_SEPARATOR, _SEPARATOR_DATA))
    boot_order = struct.pack("<HH", 1, 0)
    # EV_EFI_VARIABLE_BOOT digests cover only the variable's value (as OVMF measures them)
    var(1, EV_EFI_VARIABLE_BOOT, EFI_GLOBAL_VARIABLE, "BootOrder", boot_order, measured=boot_order)
    boot1 = _load_option("debian", "\\EFI\\debian\\shimx64.efi")
    var(1, EV_EFI_VARIABLE_BOOT, EFI_GLOBAL_VARIABLE, "Boot0001", boot1, measured=boot1)
    ev.append(LogEvent(4, EV_EFI_ACTION, b"Calling EFI Application from Boot Option"))
    ev += [LogEvent(pcr, EV_SEPARATOR, _SEPARATOR_DATA) for pcr in range(7)]
    ev.append(LogEvent(5, EV_EFI_GPT_EVENT, _gpt()))
    ev.append(LogEvent(4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load(len(c.shim), "\\EFI\\debian\\shimx64.efi"),
                       image=c.shim))
    if c.secure_boot:
        db_cert = MICROSOFT_OWNER.bytes_le + c.db[-1]
        var(7, EV_EFI_VARIABLE_AUTHORITY, EFI_IMAGE_SECURITY_DATABASE, "db", db_cert)
    ev.append(LogEvent(14, EV_IPL, b"MokList\x00", measured=b"".join(c.mok)))
    ev.append(LogEvent(14, EV_IPL, b"MokListX\x00", measured=b""))
    ev.append(LogEvent(14, EV_IPL, b"MokListTrusted\x00", measured=b"\x01"))
    ev.append(LogEvent(4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load(len(c.grub), "\\EFI\\debian\\grubx64.efi"),
                       image=c.grub))
    if c.secure_boot:
        var(7, EV_EFI_VARIABLE_AUTHORITY, SHIM_LOCK_GUID, "Shim", _cert("debian-secure-boot"))
    if c.extra_application is not None:
        ev.append(LogEvent(4, EV_EFI_BOOT_SERVICES_APPLICATION,
                           _image_load(len(c.extra_application), "\\EFI\\debian\\extra.efi"),
                           image=c.extra_application))
    grub_cfg = b"set default=0\nlinux /boot/vmlinuz\n"
    ev.append(LogEvent(9, EV_IPL, b"(hd0,gpt2)/boot/grub/grub.cfg\x00", measured=grub_cfg))
    for cmd in ("set root=hd0,gpt2", f"linux /boot/vmlinuz-{c.kernel_version} {c.cmdline}",
                f"initrd /boot/initrd.img-{c.kernel_version}"):
        text = f"grub_cmd: {cmd}"
        ev.append(LogEvent(8, EV_IPL, text.encode() + b"\x00", measured=cmd.encode()))
    ev.append(LogEvent(9, EV_IPL, f"/boot/vmlinuz-{c.kernel_version}\x00".encode(), measured=c.kernel))
    if c.secure_boot:
        # grub hands the kernel to shim_lock, which verifies and firmware-measures it (PCR 4)
        ev.append(LogEvent(4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load(len(c.kernel), ""), image=c.kernel))
    cmdline = f"/boot/vmlinuz-{c.kernel_version} {c.cmdline}"
    ev.append(LogEvent(8, EV_IPL, f"kernel_cmdline: {cmdline}\x00".encode(), measured=cmdline.encode()))
    ev.append(LogEvent(9, EV_IPL, f"/boot/initrd.img-{c.kernel_version}\x00".encode(), measured=c.initrd))
    ev.append(LogEvent(5, EV_EFI_ACTION, b"Exit Boot Services Invocation"))
    ev.append(LogEvent(5, EV_EFI_ACTION, b"Exit Boot Services Returned with Success"))
    return ev


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


def _event2(e: LogEvent, banks: Sequence[str]) -> bytes:
    digests = b"".join(struct.pack("<H", _ALG_IDS[b]) + e.digest(b) for b in banks)
    return struct.pack("<III", e.pcr, e.event_type, len(banks)) + digests + struct.pack("<I", len(e.data)) + e.data


def _check_banks(banks: Sequence[str]) -> None:
    unknown = [b for b in banks if b not in _ALG_IDS]
    if unknown:
        raise ValueError(f"unsupported banks {unknown}")


def events(banks: Sequence[str], config: BootConfig | None = None) -> list[tuple[int, dict[str, bytes]]]:
    """The PCR extends a boot with :func:`build` performs: ``[(pcr, {bank: digest})]``."""
    _check_banks(banks)
    return [(e.pcr, {b: e.digest(b) for b in banks}) for e in boot_events(config) if e.event_type != EV_NO_ACTION]


def build(banks: Sequence[str], config: BootConfig | None = None) -> bytes:
    """The binary event log matching :func:`events`."""
    _check_banks(banks)
    return _spec_id_event(banks) + b"".join(_event2(e, banks) for e in boot_events(config))


def expected_pcrs(bank: str, config: BootConfig | None = None) -> dict[int, bytes]:
    """PCR values after the boot (every PCR the boot touches), for tests and policies."""
    out: dict[int, bytes] = {}
    for pcr, digests in events([bank], config):
        out[pcr] = hashlib.new(bank, out.get(pcr, bytes(_SIZES[bank])) + digests[bank]).digest()
    return out
