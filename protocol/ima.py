"""IMA measurement list: line codec, template data/hash, boot_aggregate and PCR 10 replay.

Source of the facts (Linux security/integrity/ima, v5.x-v6.x):

- ASCII line (ima_fs.c ``ima_ascii_measurements_show``): ``<pcr> <template-hash hex> <template>``
  then, for every template field, a space and the field, printed only if its length is non-zero.
  So an ima-sig line without signature ends in a space, and an empty ima-buf buffer likewise.
- Field formats (ima_template_lib.c): ``d-ng`` = ``"<alg>:\\0" || digest`` shown as
  ``<alg>:<hex>``; ``n-ng`` = name || ``\\0`` shown as the name; ``sig`` and ``buf`` are raw bytes
  shown as hex. Strings have every space replaced by ``_`` when recorded
  (``ima_write_template_field_data``), so names in the list never contain spaces: fields are
  split on single spaces. (keytrio still accepts spaces inside an ima-ng path, the last field.)
- Template data hashed (ima_crypto.c ``ima_calc_field_array_hash_tfm``): for each field
  u32 little-endian length || field bytes, except the legacy template ``ima``, which hashes the
  20-byte digest (no length) and the name copied into a zeroed 256-byte buffer (no length).
- Violations (open-writers / ToMToU, ima_api.c ``ima_add_violation``): the digest field holds zeros,
  the listed template hash is all zeros and every PCR bank is extended with 0xff..ff.
- boot_aggregate (ima_crypto.c ``ima_calc_boot_aggregate``): H_bank(PCR0 || .. || PCR7), and since
  Linux 5.8 also PCR8 || PCR9 for banks other than SHA-1; recorded as an ima-ng entry
  ``<bank>:<hex> boot_aggregate`` (legacy ``ima`` template: SHA-1 over PCRs 0-7).
- PCR 10 in each bank b is extended with H_b(template data); the template-hash column is
  H(template data) with the runtime policy's ``ima.log_hash_alg`` (SHA-1 by default).

Pure: text and bytes in, values out. Parse errors are :class:`ImaParseError` (a DecodeError)
carrying the 0-based line number.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from keytrio.protocol.errors import DecodeError, ValidationError
from keytrio.protocol.tpm2 import DIGEST_SIZES

IMA_PCR = 10
TEMPLATES = ("ima", "ima-ng", "ima-sig", "ima-buf")
BOOT_AGGREGATE_NAME = "boot_aggregate"
#: IMA_EVENT_NAME_LEN_MAX (255) + 1: size of the zeroed name buffer of the legacy ``ima`` template.
_LEGACY_NAME_BUF = 256
# The PCR banks IMA lines are replayed in are the banks keytrio quotes: tpm2.DIGEST_SIZES.

#: Kernel hash algorithm names (crypto/hash_info.c) a d-ng field may carry, with digest sizes.
KERNEL_DIGEST_SIZES: dict[str, int] = {
    "md4": 16, "md5": 16, "sha1": 20, "rmd160": 20, "rmd256": 32, "rmd320": 40,
    "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64,
    "wp256": 32, "wp384": 48, "wp512": 64, "tgr128": 16, "tgr160": 20, "tgr192": 24,
    "sm3": 32, "streebog256": 32, "streebog512": 64,
    "sha3-256": 32, "sha3-384": 48, "sha3-512": 64,
}  # fmt: skip

_TEMPLATE_HASH_SIZES = frozenset(DIGEST_SIZES.values())


class ImaParseError(DecodeError):
    """A measurement-list line is malformed; ``line_no`` is its 0-based index in the whole list."""

    def __init__(self, line_no: int, reason: str) -> None:
        super().__init__(f"IMA line {line_no}: {reason}")
        self.line_no = line_no
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entry:
    """One measurement. ``path`` is the file path (the buffer name for ima-buf)."""

    pcr: int
    template_hash: bytes
    template: str
    digest_alg: str
    digest: bytes
    path: str
    signature: bytes | None = None  # ima-sig only; None when absent
    buf: bytes | None = None  # ima-buf only
    line_no: int = field(default=0, compare=False)

    @property
    def is_violation(self) -> bool:
        """A violation (ToMToU / open-writers) entry: all-zero template hash, extends 0xff..ff."""
        return not any(self.template_hash)

    @property
    def name(self) -> str:
        return self.path


# --- template data and hashes ----------------------------------------------------------------


def _lv(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _name_bytes(name: str) -> bytes:
    # surrogateescape lets a caller that decoded raw kernel bytes the same way get them back.
    return name.encode("utf-8", "surrogateescape")


def template_data(entry: Entry) -> bytes:
    """The bytes the kernel hashes for this entry (see module docstring for the layout)."""
    name = _name_bytes(entry.path)
    if entry.template == "ima":
        return entry.digest + name + bytes(_LEGACY_NAME_BUF - len(name))
    out = _lv(entry.digest_alg.encode("ascii") + b":\0" + entry.digest) + _lv(name + b"\0")
    if entry.template == "ima-sig":
        out += _lv(entry.signature or b"")
    elif entry.template == "ima-buf":
        out += _lv(entry.buf or b"")
    return out


def _hash(alg: str, data: bytes) -> bytes:
    if alg not in DIGEST_SIZES:
        raise ValidationError("hash_alg", f"unsupported hash algorithm {alg!r}")
    return hashlib.new(alg, data).digest()


def template_hash(entry: Entry, alg: str = "sha1") -> bytes:
    """H_alg(template data): the template-hash column for ``ima.log_hash_alg`` = ``alg``."""
    return _hash(alg, template_data(entry))


def check_template_hash(entry: Entry, alg: str = "sha1") -> bool:
    """True when the listed template hash is H_alg(template data) (violations: always True)."""
    return entry.is_violation or entry.template_hash == template_hash(entry, alg)


def extend_digest(entry: Entry, bank: str) -> bytes:
    """What the kernel extends into PCR 10 of ``bank`` for this entry."""
    size = bank_size(bank)
    if entry.is_violation:
        return b"\xff" * size
    return _hash(bank, template_data(entry))


# --- line codec --------------------------------------------------------------------------------


def format_line(entry: Entry) -> str:
    """The ASCII list line (without newline), as the kernel prints it."""
    head = f"{entry.pcr} {entry.template_hash.hex()} {entry.template}"
    if entry.template == "ima":
        return f"{head} {entry.digest.hex()} {entry.path}"
    ng = f"{head} {entry.digest_alg}:{entry.digest.hex()} {entry.path}"
    if entry.template == "ima-sig":
        return f"{ng} {(entry.signature or b'').hex()}"
    if entry.template == "ima-buf":
        return f"{ng} {(entry.buf or b'').hex()}"
    return ng


def _hex(text: str, line_no: int, what: str) -> bytes:
    # bytes.fromhex is the fast path (this runs twice per line on 100,000-line logs); it skips
    # ASCII whitespace, so a length check catches input that was not pure hex.
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ImaParseError(line_no, f"{what} is not even-length hex") from None
    if 2 * len(raw) != len(text):
        raise ImaParseError(line_no, f"{what} is not even-length hex")
    return raw


def _digest_ng(text: str, line_no: int) -> tuple[str, bytes]:
    alg, sep, hexd = text.partition(":")
    if not sep:
        raise ImaParseError(line_no, "digest lacks '<alg>:'")
    size = KERNEL_DIGEST_SIZES.get(alg)
    if size is None:
        raise ImaParseError(line_no, f"unknown digest algorithm {alg[:32]!r}")
    digest = _hex(hexd, line_no, "digest")
    if len(digest) != size:
        raise ImaParseError(line_no, f"{alg} digest must be {size} bytes")
    return alg, digest


def _check_name(name: str, line_no: int, *, legacy: bool) -> None:
    if "\0" in name:
        raise ImaParseError(line_no, "name contains NUL")
    try:
        raw = _name_bytes(name)
    except UnicodeEncodeError as exc:
        raise ImaParseError(line_no, "name is not encodable") from exc
    if legacy and len(raw) >= _LEGACY_NAME_BUF:
        raise ImaParseError(line_no, "name longer than 255 bytes for template ima")


def parse_line(line: str, line_no: int = 0) -> Entry:
    """Parse one list line (without its newline). Raises ImaParseError."""
    if not isinstance(line, str):
        raise ImaParseError(line_no, "not text")
    if "\n" in line:
        raise ImaParseError(line_no, "contains a newline")
    parts = line.split(" ", 3)
    if len(parts) != 4:
        raise ImaParseError(line_no, "expected '<pcr> <template-hash> <template> <fields>'")
    pcr_text, th_text, template, rest = parts
    if not (pcr_text.isascii() and pcr_text.isdigit() and len(pcr_text) <= 2) or int(pcr_text) > 23:
        raise ImaParseError(line_no, "PCR must be 0-23")
    th = _hex(th_text, line_no, "template hash")
    if len(th) not in _TEMPLATE_HASH_SIZES:
        raise ImaParseError(line_no, "template hash has no known digest size")
    sig: bytes | None = None
    buf: bytes | None = None
    if template == "ima":
        dtext, sep, path = rest.partition(" ")
        if not sep:
            raise ImaParseError(line_no, "ima entry needs '<digest> <name>'")
        digest = _hex(dtext, line_no, "digest")
        alg = {20: "sha1", 16: "md5"}.get(len(digest))
        if alg is None:
            raise ImaParseError(line_no, "ima digest must be 20 (sha1) or 16 (md5) bytes")
        _check_name(path, line_no, legacy=True)
    elif template == "ima-ng":
        dtext, sep, path = rest.partition(" ")
        if not sep:
            raise ImaParseError(line_no, "ima-ng entry needs '<alg>:<digest> <path>'")
        alg, digest = _digest_ng(dtext, line_no)
        _check_name(path, line_no, legacy=False)
    elif template in ("ima-sig", "ima-buf"):
        fields = rest.split(" ", 2)
        if len(fields) == 2 and template == "ima-sig":
            fields.append("")  # tolerate a list whose trailing space was stripped
        if len(fields) != 3:
            raise ImaParseError(line_no, f"{template} entry needs 3 fields")
        alg, digest = _digest_ng(fields[0], line_no)
        path = fields[1]
        _check_name(path, line_no, legacy=False)
        extra = _hex(fields[2], line_no, "signature" if template == "ima-sig" else "buffer")
        if template == "ima-sig":
            sig = extra or None
        else:
            buf = extra
    else:
        raise ImaParseError(line_no, f"unsupported template {template[:32]!r}")
    return Entry(int(pcr_text), th, template, alg, digest, path, sig, buf, line_no)


def parse_list(text: str, start_line: int = 0) -> list[Entry]:
    """Parse a list (or the tail of one starting at line ``start_line``); one final newline allowed."""
    if not isinstance(text, str):
        raise ImaParseError(start_line, "measurement list is not text")
    return [parse_line(line, start_line + i) for i, line in enumerate(split_lines(text))]


def split_lines(text: str) -> list[str]:
    """The lines of a list (or of a tail of one), without newlines; one final newline allowed."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


# --- building entries --------------------------------------------------------------------------


def _kernel_name(path: str, *, legacy: bool) -> str:
    if not isinstance(path, str) or "\n" in path or "\0" in path:
        raise ValidationError("path", "must be text without newline or NUL")
    name = path.replace(" ", "_")  # the kernel records spaces as underscores
    try:
        raw = _name_bytes(name)
    except UnicodeEncodeError as exc:
        raise ValidationError("path", "not encodable as UTF-8") from exc
    if legacy and len(raw) >= _LEGACY_NAME_BUF:
        raise ValidationError("path", "longer than 255 bytes for template ima")
    return name


def build_entry(
    template: str,
    path: str,
    digest_alg: str,
    digest: bytes,
    *,
    signature: bytes | None = None,
    buf: bytes | None = None,
    template_hash_alg: str = "sha1",
    pcr: int = IMA_PCR,
) -> Entry:
    """An entry as the kernel would record it, with its template hash computed."""
    if template not in TEMPLATES:
        raise ValidationError("template", f"unsupported template {template!r}")
    if KERNEL_DIGEST_SIZES.get(digest_alg) != len(digest):
        raise ValidationError("digest", f"not a {digest_alg} digest")
    if template == "ima" and digest_alg not in ("sha1", "md5"):
        raise ValidationError("digest_alg", "template ima records sha1 or md5 digests only")
    if not 0 <= pcr <= 23:
        raise ValidationError("pcr", "must be 0-23")
    if (signature is not None and template != "ima-sig") or (buf is not None) != (template == "ima-buf"):
        raise ValidationError("template", "signature is for ima-sig, buf for (and required by) ima-buf")
    name = _kernel_name(path, legacy=template == "ima")
    entry = Entry(pcr, b"", template, digest_alg, bytes(digest), name, signature or None, buf)
    th = template_hash(entry, template_hash_alg)
    return Entry(pcr, th, template, digest_alg, bytes(digest), name, signature or None, buf)


def violation_entry(
    path: str,
    *,
    template: str = "ima-ng",
    digest_alg: str = "sha256",
    template_hash_alg: str = "sha1",
    pcr: int = IMA_PCR,
) -> Entry:
    """A ToMToU / open-writers violation: zero digest, zero template hash (extends 0xff..ff)."""
    if template == "ima":
        digest_alg = "sha1"
    if template == "ima-buf" or template not in TEMPLATES:
        raise ValidationError("template", f"no violation entries for template {template!r}")
    if digest_alg not in KERNEL_DIGEST_SIZES:
        raise ValidationError("digest_alg", f"unknown digest algorithm {digest_alg!r}")
    if template_hash_alg not in DIGEST_SIZES:
        raise ValidationError("template_hash_alg", f"unsupported hash algorithm {template_hash_alg!r}")
    name = _kernel_name(path, legacy=template == "ima")
    th = bytes(DIGEST_SIZES[template_hash_alg])
    return Entry(pcr, th, template, digest_alg, bytes(KERNEL_DIGEST_SIZES[digest_alg]), name)


def boot_aggregate(bank: str, pcr_values: Mapping[int, bytes], *, pcrs_8_9: bool = False) -> bytes:
    """H_bank(PCR0 || … || PCR7), or through PCR9 (Linux >= 5.8, non-SHA-1 banks)."""
    size = bank_size(bank)
    h = hashlib.new(bank)
    for i in range(10 if pcrs_8_9 else 8):
        value = pcr_values.get(i)
        if not isinstance(value, bytes | bytearray) or len(value) != size:
            raise ValidationError("pcr_values", f"PCR {i} missing or not a {bank} value")
        h.update(value)
    return h.digest()


def boot_aggregate_entry(
    bank: str,
    pcr_values: Mapping[int, bytes],
    *,
    pcrs_8_9: bool = False,
    template: str = "ima-ng",
    template_hash_alg: str = "sha1",
) -> Entry:
    """The first list entry, ``<bank>:<aggregate> boot_aggregate``."""
    if template == "ima" and (bank != "sha1" or pcrs_8_9):
        raise ValidationError("bank", "template ima has a SHA-1 boot_aggregate over PCRs 0-7")
    digest = boot_aggregate(bank, pcr_values, pcrs_8_9=pcrs_8_9)
    return build_entry(template, BOOT_AGGREGATE_NAME, bank, digest, template_hash_alg=template_hash_alg)


# --- replay ------------------------------------------------------------------------------------


def bank_size(bank: str) -> int:
    """The digest size of a PCR bank keytrio replays; ValidationError for any other bank."""
    size = DIGEST_SIZES.get(bank)
    if size is None:
        raise ValidationError("bank", f"unsupported PCR bank {bank!r}")
    return size


def pcr_value(bank: str, value: object, what: str) -> bytes:
    """``value`` as bytes when it is a PCR value of ``bank``; ValidationError naming ``what`` if not."""
    size = bank_size(bank)
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise ValidationError(what, f"not a {bank} PCR value")
    return bytes(value)


def _start(bank: str, start_value: bytes | None) -> bytes:
    if start_value is None:
        return bytes(bank_size(bank))
    return pcr_value(bank, start_value, "start_value")


def replay(entries: Iterable[Entry], bank: str, start_value: bytes | None = None) -> bytes:
    """PCR 10 of ``bank`` after extending every entry, starting from ``start_value`` (zeros)."""
    value = _start(bank, start_value)
    for e in entries:
        value = hashlib.new(bank, value + extend_digest(e, bank)).digest()
    return value


def match_prefix(
    entries: Sequence[Entry], bank: str, target: bytes, start: bytes | None = None
) -> int | None:
    """The smallest n such that replaying ``entries[:n]`` from ``start`` gives ``target``.

    Lets a verifier accept a log that runs ahead of the quote: lines from n on are checked at
    the next quote. None when no prefix (including the empty one) matches.
    """
    value = _start(bank, start)
    if value == target:
        return 0
    for n, e in enumerate(entries, 1):
        value = hashlib.new(bank, value + extend_digest(e, bank)).digest()
        if value == target:
            return n
    return None


class Replayer:
    """Running PCR 10 values per bank across successive slices of one list.

    ``count`` is the number of entries folded in so far (the next ``ima_ml_entry``).
    """

    def __init__(
        self, banks: Iterable[str], start: Mapping[str, bytes] | None = None, count: int = 0
    ) -> None:
        start = start or {}
        self.values: dict[str, bytes] = {b: _start(b, start.get(b)) for b in banks}
        self.count = count

    def feed(self, entry: Entry) -> None:
        data = None if entry.is_violation else template_data(entry)
        for bank, value in self.values.items():
            ext = b"\xff" * DIGEST_SIZES[bank] if data is None else hashlib.new(bank, data).digest()
            self.values[bank] = hashlib.new(bank, value + ext).digest()
        self.count += 1

    def feed_all(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self.feed(e)

    def value(self, bank: str) -> bytes:
        return self.values[bank]

    def advance_to(self, entries: Sequence[Entry], bank: str, target: bytes) -> int | None:
        """Fold in the shortest prefix of ``entries`` that brings ``bank`` to ``target``.

        Returns its length (0 if already there), or None, leaving the state untouched.
        """
        if bank not in self.values:
            raise ValidationError("bank", f"bank {bank!r} is not tracked")
        n = match_prefix(entries, bank, target, self.values[bank])
        if n is not None:
            self.feed_all(entries[:n])
        return n
