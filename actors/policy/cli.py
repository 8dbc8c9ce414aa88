"""``keytrio policy create runtime|measured-boot``, ``sign``, ``verify``: policy tools.

``create measured-boot --event-log FILE [-i] [-o OUT]`` writes the reference state upstream's
``keylime-policy create measured-boot`` writes for the same log (protocol.mb_create) where
upstream's format can say the boot, and keytrio's extension of it where it cannot (systemd-boot, a
unified kernel image or any other boot-application chain, no initrd, no kernel command line,
SHA-1-format logs, events of kinds upstream's rules refuse, pinned by digest). Errors name the
policy field or the event (number, PCR, type, byte offset).

Exit codes: 0 ok, 2 usage (bad arguments, unreadable input, an invalid policy), 4 a signature that
does not verify (``verify``). Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from keytrio.actors.policy import create, sign
from keytrio.actors.policy.create import PolicyToolError
from keytrio.protocol import eventlog, eventlog_parse, mb_create, mb_policy
from keytrio.protocol.errors import ProtocolError

EXIT_USAGE = 2
EXIT_INVALID = 4


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("policy", help="create, sign and verify runtime (IMA) policies")
    verbs = p.add_subparsers(dest="policy_verb", metavar="ACTION", required=True)

    cr = verbs.add_parser("create", help="create a policy")
    kinds = cr.add_subparsers(dest="policy_kind", metavar="KIND", required=True)
    rt = kinds.add_parser("runtime", help="a runtime (IMA) policy from a file tree, an IMA log and/or allowlist lines")
    rt.add_argument("--root", type=Path, help="file tree to hash (paths become /<relative path>)")
    rt.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="path regex to skip and to put into the policy's excludes (repeatable)")
    rt.add_argument("--exclude-file", type=Path, help="file of exclude regexes, one a line")
    rt.add_argument("--ima-log", type=Path, help="IMA measurement list (ascii_runtime_measurements)")
    rt.add_argument("--allowlist", type=Path, help="'<hex digest> <path>' lines (sha256sum output)")
    rt.add_argument("--base", type=Path, help="an existing policy to add to")
    rt.add_argument("--hash", default="sha256", choices=create.HASH_ALGS, help="digest for --root files (default %(default)s)")
    rt.add_argument("--ima-key", action="append", type=Path, default=[], metavar="CERT|PUBKEY",
                    help="IMA signature verification key to embed (repeatable)")
    rt.add_argument("--no-keyrings", action="store_true", help="do not add keyring entries of the IMA log")
    rt.add_argument("--no-ima-buf", action="store_true", help="do not add ima-buf entries of the IMA log")
    rt.add_argument("-o", "--output", type=Path, help="write the policy here (default stdout)")
    rt.set_defaults(func=main)

    mbp_ = kinds.add_parser("measured-boot", help="a measured-boot reference state from a known-good UEFI event log")
    mbp_.add_argument("-e", "--event-log", "--eventlog-file", dest="event_log", type=Path, required=True,
                      metavar="FILE", help="binary UEFI event log (/sys/kernel/security/tpm0/binary_bios_measurements)")
    mbp_.add_argument("-i", "--without-secureboot", action="store_true",
                      help="allow a log with Secure Boot disabled (measured boot only)")
    mbp_.add_argument("-o", "--output", type=Path, help="write the reference state here (default stdout)")
    mbp_.set_defaults(func=main)

    sg = verbs.add_parser("sign", help="sign a policy into a DSSE envelope (ECDSA)")
    sg.add_argument("policy", type=Path, metavar="POLICY")
    key = sg.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", type=Path, metavar="PEM", help="EC private key (PEM)")
    key.add_argument("--keyout", type=Path, metavar="PEM",
                     help="generate a P-256 key here (0600); its public key goes to PEM.pub")
    sg.add_argument("--cert", type=Path, help="certificate of the key (x509 backend keyid)")
    sg.add_argument("-o", "--output", type=Path, help="write the envelope here (default stdout)")
    sg.set_defaults(func=main)

    vf = verbs.add_parser("verify", help="verify a signed policy (exit 0 valid, 4 invalid)")
    vf.add_argument("envelope", type=Path, metavar="ENVELOPE")
    vf.add_argument("--key", type=Path, required=True, metavar="PEM|CERT", help="EC public key or certificate")
    vf.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    verb = args.policy_verb
    try:
        if verb == "create":
            return _create(args, out, err)
        if verb == "sign":
            return _sign(args, out, err)
        return _verify(args, out, err)
    except PolicyToolError as exc:
        print(f"keytrio policy {verb}: {exc}", file=err)
        return EXIT_USAGE


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyToolError(f"{what} {path}: unreadable ({exc.strerror or exc})") from exc


def _text(path: Path, what: str) -> str:
    try:
        return _read(path, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyToolError(f"{what} {path}: not UTF-8 text") from exc


def _write(data: str, path: Path | None, out: TextIO) -> None:
    if path is None:
        out.write(data + "\n")
        return
    try:
        path.write_text(data + "\n")
    except OSError as exc:
        raise PolicyToolError(f"-o {path}: cannot write ({exc.strerror or exc})") from exc


def _create_measured_boot(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    raw = _read(args.event_log, "--event-log")
    try:
        log = eventlog_parse.parse(raw)
        ref = mb_create.refstate_from_log(log, allow_no_secureboot=args.without_secureboot)
        mb_policy.parse_refstate(ref)  # refuse to write what the verifier would refuse
    except eventlog.EventLogError as exc:
        raise PolicyToolError(f"--event-log {args.event_log}: not a UEFI event log ({exc})") from None
    except (mb_policy.MbPolicyError, mb_create.RefStateCreateError) as exc:
        # the field (mb_policy.<path> or event_log) and, for the log, the event are in the text
        raise PolicyToolError(f"--event-log {args.event_log}: {exc}") from None
    _write(json.dumps(ref), args.output, out)
    print(f"measured-boot policy: secure boot {'on' if ref['has_secureboot'] else 'off'}, "
          f"{len(log.events)} events" + (f" -> {args.output}" if args.output else ""), file=err)
    return 0


def _create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.policy_kind == "measured-boot":
        return _create_measured_boot(args, out, err)
    if not (args.root or args.ima_log or args.allowlist or args.base):
        raise PolicyToolError("give at least one of --root, --ima-log, --allowlist, --base")
    if args.base:
        policy = create.load_base(_read(args.base, "--base"))
    else:
        policy = create.empty_policy()
    excludes = list(args.exclude)
    if args.exclude_file:
        excludes += [ln.strip() for ln in _text(args.exclude_file, "--exclude-file").splitlines()
                     if ln.strip() and not ln.lstrip().startswith("#")]
    counts = []
    if args.root:
        counts.append(f"{create.add_tree(policy, args.root, hash_alg=args.hash, excludes=excludes)} files")
    elif excludes:
        create.add_excludes(policy, excludes)
    if args.ima_log:
        n = create.add_ima_log(policy, _text(args.ima_log, "--ima-log"), keyrings=not args.no_keyrings,
                               ima_buf=not args.no_ima_buf)
        counts.append(f"{n} IMA entries")
    if args.allowlist:
        counts.append(f"{create.add_allowlist(policy, _text(args.allowlist, '--allowlist'))} allowlist lines")
    if args.ima_key:
        create.add_verification_keys(policy, [_read(p, "--ima-key") for p in args.ima_key])
    text = create.dumps(policy)
    parsed = create.validate(text)  # refuse to write what the verifier would refuse
    _write(text, args.output, out)
    print(f"policy: {len(parsed.digests)} paths, {len(parsed.excludes)} excludes ({', '.join(counts) or 'base only'})"
          + (f" -> {args.output}" if args.output else ""), file=err)
    return 0


def _sign(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = _read(args.policy, "policy")
    if args.keyout:
        try:
            key, pub = sign.new_key(args.keyout)
        except OSError as exc:
            raise PolicyToolError(f"--keyout {args.keyout}: cannot write ({exc.strerror or exc})") from exc
        print(f"new signing key {args.keyout}, public key {pub}", file=err)
    else:
        key = sign.load_private_key(args.key)
    cert = _read(args.cert, "--cert") if args.cert else None
    _write(sign.sign_policy(policy, key, certificate=cert), args.output, out)
    return 0


def _verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    envelope = _read(args.envelope, "envelope")
    key = _read(args.key, "--key")
    try:
        parsed = sign.verify_policy(envelope, key)
    except ProtocolError as exc:
        print(f"keytrio policy verify: {args.envelope} is NOT valid with {args.key}: {exc}", file=err)
        return EXIT_INVALID
    print(f"{args.envelope}: valid signature by {args.key}; policy with {len(parsed.digests)} paths, sha256 {parsed.checksum}",
          file=out)
    return 0
