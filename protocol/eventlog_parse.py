"""A binary TCG event log (``binary_bios_measurements``) read into an EventLog.

Two layouts exist, and real TPM 2.0 machines write both:

* **crypto-agile**: a first TCG_PCR_EVENT (SHA-1 layout) that is the EV_NO_ACTION "Spec ID Event03"
  naming the banks and their digest sizes, then TCG_PCR_EVENT2 records (a digest list each);
* **SHA-1** ("TCG 1.2 style", TCG_PCR_EVENT only: PCR, type, one SHA-1 digest, data): what the
  firmware of many TPM 2.0 machines still writes (and every TPM 1.2 machine). Any log whose first
  event is not a Spec ID Event03 is read in this layout, like go-attestation and tpm2-tools do.

:func:`parse` gives an :class:`~protocol.eventlog.EventLog`; structural damage (truncation, an
algorithm the Spec ID event does not name, absurd sizes, trailing bytes that are no event) raises
:class:`~protocol.eventlog.EventLogError` (a :class:`~protocol.errors.DecodeError`) naming the
byte offset. Event *data* is decoded by :mod:`protocol.eventlog_data` (kept raw, with
``decode_error`` set, where it does not decode: real firmware writes odd data and the digests
still replay).

Events with fewer digests than the Spec ID event names are read (each digest's size comes from
the Spec ID event), as tpm2-tools and go-attestation read them; what that means for their PCRs is
in :mod:`protocol.eventlog_replay`. Two digests of one algorithm, or one the Spec ID event does not
name, are structural errors. Algorithms the Spec ID event names but keytrio cannot hash (an
unknown id) still parse.
"""

from __future__ import annotations

from keytrio.protocol.eventlog import (
    EV_NO_ACTION,
    LOG_DIGEST_SIZES,
    MAX_EVENT_SIZE,
    ByteReader,
    Event,
    EventLog,
    EventLogError,
    SpecId,
    alg_name,
)
from keytrio.protocol.eventlog_data import decode_into

MAX_EVENTS = 1_000_000
_MAX_DIGEST = 128  # an unknown algorithm's digest size from the Spec ID event is believed up to this
_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"


def _parse_spec_id(data: bytes, start: int, end: int) -> SpecId:
    """TCG_EfiSpecIDEventStruct at data[start:end] (offsets in errors are the log's)."""
    r = ByteReader(data, start, end)

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
        if (name in LOG_DIGEST_SIZES and size != LOG_DIGEST_SIZES[name]) or not 1 <= size <= _MAX_DIGEST:
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


def _sha1_event(r: ByteReader, number: int) -> Event:
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


def _agile_event(r: ByteReader, number: int, algs: dict[str, int]) -> Event:
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
    r = ByteReader(data)
    first = _sha1_event(r, 0)
    spec: SpecId | None = None
    if first.event_type == EV_NO_ACTION and first.data.startswith(_SPEC_ID_SIGNATURE):
        spec = _parse_spec_id(data, first.offset + 32, first.offset + 32 + len(first.data))
        first.decoded = {"SpecID": {"algorithms": dict(spec.algorithms), "uintnSize": spec.uintn_size,
                                    "platformClass": spec.platform_class,
                                    "vendorInfo": spec.vendor_info.hex()}}  # fmt: skip
    log = EventLog(spec, [first])
    if spec is None and decode:
        decode_into(first)
    _check_pcr(first)
    while r.remaining:
        number = len(log.events)
        ev = _sha1_event(r, number) if spec is None else _agile_event(r, number, spec.algorithms)
        _check_pcr(ev)
        if decode:
            decode_into(ev)
        log.events.append(ev)
        if len(log.events) > MAX_EVENTS:
            raise EventLogError("too many events", r.pos)
    return log


def _check_pcr(ev: Event) -> None:
    # EV_NO_ACTION is never extended, and Windows writes some with PCR index 0xffffffff
    if ev.pcr > 31 and ev.event_type != EV_NO_ACTION:
        raise EventLogError(f"event {ev.number}: PCR index {ev.pcr}", ev.offset)
