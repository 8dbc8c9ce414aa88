"""``keytrio eventlog FILE [--json] [--replay] [--pcrs 0,4,7] [--bank B]``: an operator's dump of any
UEFI event log (crypto-agile or SHA-1 format), event by event, and its replay per bank.

Each event shows its number, PCR, type, byte offset, digests and decoded data, and whether its
data is bound to its digest (``data: bound``: the data hashes to the digests; ``digest-only``: the
digest is over something else, an image or a file, so the data is a hint; ``MISMATCH``: the data
was edited after the measurement, see protocol.eventlog). ``--replay`` adds the PCR values the log
produces in each bank; a PCR whose events lack that bank's digest is shown as unknown.

Exit codes: 0 dumped, 1 the file is not an event log (the error names the byte offset), 2 usage
(unreadable file, bad option). Only protocol.eventlog is needed, so ``python -m
keytrio.actors.eventlog FILE`` runs without loading the servers' modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from keytrio.protocol import eventlog as el
from keytrio.protocol import eventlog_data, eventlog_parse, eventlog_replay

EXIT_BAD_LOG = 1
EXIT_USAGE = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, metavar="FILE",
                   help="binary event log (/sys/kernel/security/tpm0/binary_bios_measurements)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.add_argument("--replay", action="store_true", help="also print the PCR values the log produces, per bank")
    p.add_argument("--pcrs", metavar="LIST", help="only these PCRs, e.g. 0,4,7 (events and replay)")
    p.add_argument("--bank", action="append", default=None, metavar="BANK",
                   help="replay only this bank (repeatable; default every bank of the log)")
    p.set_defaults(func=main)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eventlog", help="dump a UEFI event log event by event, and replay it per bank")
    add_arguments(p)


def _pcr_list(text: str | None) -> set[int] | None:
    if text is None:
        return None
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > 31:
            raise ValueError(f"--pcrs {text!r}: expected PCR numbers 0-31 separated by commas")
        out.add(int(part))
    return out


def _replay(log: el.EventLog, banks: list[str], pcrs: set[int] | None) -> dict[str, dict[str, str]]:
    """bank -> PCR -> hex value, or 'unknown: <why>' for a PCR the bank cannot replay."""
    out: dict[str, dict[str, str]] = {}
    for bank in banks:
        values: dict[str, str] = {}
        gaps = eventlog_replay.incomplete_pcrs(log, bank)
        with_events = {ev.pcr for ev in log.events if ev.event_type != el.EV_NO_ACTION}
        wanted = sorted(with_events if pcrs is None else pcrs)
        try:
            got = eventlog_replay.replay(log, bank, [p for p in wanted if p not in gaps])
        except el.EventLogError as exc:  # a bank keytrio cannot hash
            out[bank] = {str(p): f"unknown: {exc}" for p in wanted}
            continue
        for p in wanted:
            values[str(p)] = f"unknown: {gaps[p].where()} has no {bank} digest" if p in gaps else got[p].hex()
        out[bank] = values
    return out


def _event_json(ev: el.Event, log_format: str) -> dict[str, Any]:
    doc = ev.to_json()
    doc["Offset"] = ev.offset
    doc["DataDigest"] = eventlog_data.data_binding(ev, log_format)
    if ev.decode_error:
        doc["DecodeError"] = ev.decode_error
    return doc


def _default(value: object) -> str:
    # decoded event data is JSON already; anything else (bytes) is shown as hex
    return value.hex() if isinstance(value, bytes | bytearray) else repr(value)


def _text(log: el.EventLog, events: list[el.Event], replayed: dict[str, dict[str, str]] | None,
          out: TextIO) -> None:
    out.write(f"format: {log.format}  banks: {', '.join(f'{b} ({n} bytes)' for b, n in log.algorithms.items())}"
              f"  events: {len(log.events)}\n")
    binding = {eventlog_data.BOUND: "bound", eventlog_data.NOT_BOUND: "digest-only", eventlog_data.MISMATCH: "MISMATCH"}
    for ev in events:
        out.write(f"\n#{ev.number} PCR {ev.pcr} {ev.type_name} at byte {ev.offset}, {len(ev.data)} bytes of data, "
                  f"data: {binding[eventlog_data.data_binding(ev, log.format)]}\n")
        for bank, digest in ev.digests.items():
            out.write(f"  {bank}: {digest.hex()}\n")
        if ev.decoded is not None:
            text = json.dumps(ev.decoded, default=_default)
            out.write(f"  {text if len(text) <= 400 else text[:400] + ' ...'}\n")
        else:
            raw = ev.data.hex()
            out.write(f"  data: {raw if len(raw) <= 128 else raw[:128] + ' ...'}"
                      + (f"  (does not decode: {ev.decode_error})" if ev.decode_error else "") + "\n")
    if replayed is not None:
        for bank, values in replayed.items():
            out.write(f"\nPCRs ({bank}):\n")
            for p, v in values.items():
                out.write(f"  {int(p):>2}: {v}\n")


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        pcrs = _pcr_list(args.pcrs)
        raw = args.file.read_bytes()
    except ValueError as exc:
        print(f"keytrio eventlog: {exc}", file=err)
        return EXIT_USAGE
    except OSError as exc:
        print(f"keytrio eventlog: {args.file}: unreadable ({exc.strerror or exc})", file=err)
        return EXIT_USAGE
    try:
        log = eventlog_parse.parse(raw)
    except el.EventLogError as exc:
        print(f"keytrio eventlog: {args.file}: not an event log: {exc}", file=err)
        return EXIT_BAD_LOG
    banks = args.bank or log.banks
    unknown = [b for b in banks if b not in log.algorithms]
    if unknown:
        print(f"keytrio eventlog: --bank {unknown[0]}: the log's banks are {', '.join(log.banks)}", file=err)
        return EXIT_USAGE
    events = [ev for ev in log.events if pcrs is None or ev.pcr in pcrs]
    replayed = _replay(log, banks, pcrs) if args.replay else None
    try:
        if args.json:
            doc: dict[str, Any] = {"format": log.format, "banks": log.algorithms,
                                   "events": [_event_json(ev, log.format) for ev in events]}
            if replayed is not None:
                doc["pcrs"] = replayed
            json.dump(doc, out, default=_default, indent=1)
            out.write("\n")
        else:
            _text(log, events, replayed, out)
        out.flush()
    except BrokenPipeError:  # `keytrio eventlog FILE | head`
        return 0
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keytrio eventlog", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))
