"""A parsed event log folded into PCR values of one bank.

:func:`replay` folds the events into PCR values for one bank (EV_NO_ACTION never extends; the
StartupLocality EV_NO_ACTION event sets PCR 0's initial value, as the PC Client spec says; PCRs
17-22 start as all ones, as after every TPM2_Startup without a D-RTM launch).

**Events with fewer digests than the Spec ID event names.** The PC Client Platform Firmware Profile
wants one digest per active bank in every event, but real and test logs carry fewer
(tpm2-tools' event-uefivar/uefiaction fixtures). tpm2-tools and go-attestation read such events
(each digest's size comes from the Spec ID event); so does :func:`protocol.eventlog_parse.parse`.
What the missing digest would have been is unknowable, so a PCR that such an event extends has no
value in that bank: :func:`replay` raises :class:`~protocol.eventlog.EventLogError` naming the
event when asked for it (go-attestation's replay fails the same way; tpm2-tools prints a value no
TPM holds), and :func:`incomplete_pcrs` says which PCRs are affected. Algorithms the Spec ID event
names but keytrio cannot hash (an unknown id) still parse; replaying that bank raises
:class:`~protocol.eventlog.EventLogError`. sm3_256 replays (hashlib or ``cryptography``'s SM3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from keytrio.protocol.eventlog import (
    EV_NO_ACTION,
    LOG_DIGEST_SIZES,
    STARTUP_LOCALITY,
    Event,
    EventLog,
    EventLogError,
    hash_data,
)

_DRTM_PCRS = range(17, 23)  # reset to all ones at TPM2_Startup (PC Client PCR usage)


def startup_locality(log: EventLog) -> int:
    """The H-CRTM/StartupLocality value from an EV_NO_ACTION event on PCR 0 (0 when absent)."""
    for ev in log.events:
        if ev.event_type == EV_NO_ACTION and ev.pcr == 0 and ev.data.startswith(STARTUP_LOCALITY):
            if len(ev.data) >= len(STARTUP_LOCALITY) + 1:
                return ev.data[len(STARTUP_LOCALITY)]
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
    if bank in LOG_DIGEST_SIZES and bank != "sm3_256":
        return lambda b: hashlib.new(bank, b).digest()
    return lambda b: hash_data(bank, b)


def mismatched_pcrs(log: EventLog, bank: str, quoted: dict[int, bytes], pcrs: Iterable[int]) -> list[int]:
    """PCRs (of ``pcrs`` that were quoted) whose quoted value differs from the log's replay."""
    replayed = replay(log, bank, [p for p in pcrs if p in quoted])
    return sorted(p for p, v in replayed.items() if quoted.get(p) != v)
