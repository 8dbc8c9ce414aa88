"""``keytrio ca init|issue|list|revoke``: the server-components CA for a deployment.

Each certificate has one purpose (extended key usage): servers serverAuth, clients clientAuth,
the revocation notifier keytrio's revocation-signing purpose, which no TLS server accepts.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from keytrio.actors.ca.authority import Authority, CaError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ca", help="the server-components certificate authority (cv_ca layout)")
    verbs = p.add_subparsers(dest="ca_verb", metavar="ACTION", required=True)

    init = verbs.add_parser("init", help="create a CA with upstream's server, client and RevocationNotifier pairs")
    init.add_argument("--dir", type=Path, required=True, help="CA directory (e.g. /var/lib/keytrio/cv_ca)")
    init.add_argument("--name", default="keytrio CA", help="CA common name (default %(default)s)")
    init.add_argument("--ip", action="append", default=None, help="server cert IP SAN (repeatable; default 127.0.0.1)")
    init.add_argument("--dns", action="append", default=None, help="server cert DNS SAN (repeatable; default localhost)")
    init.add_argument("--bare", action="store_true", help="only the CA itself, no default certificates")
    init.set_defaults(func=_init)

    issue = verbs.add_parser("issue", help="issue a server, client or revocation-notifier certificate")
    issue.add_argument("--dir", type=Path, required=True, help="CA directory")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--server", metavar="NAME", help="a server certificate, serverAuth only (needs --ip and/or --dns)")
    who.add_argument("--client", metavar="NAME", help="a client certificate, clientAuth only (tenant, verifier)")
    who.add_argument("--notifier", metavar="NAME",
                     help="a revocation-notifier certificate (RSA; signs revocation notices, no TLS use)")
    issue.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    issue.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default %(default)s)")
    issue.set_defaults(func=_issue)

    ls = verbs.add_parser("list", help="list the certificates the CA issued")
    ls.add_argument("--dir", type=Path, required=True, help="CA directory")
    ls.set_defaults(func=_list)

    rv = verbs.add_parser("revoke", help="revoke a certificate (by name or serial) and rewrite cacrl.pem")
    rv.add_argument("--dir", type=Path, required=True, help="CA directory")
    rv.add_argument("what", metavar="NAME|SERIAL")
    rv.set_defaults(func=_revoke)


def _fail(exc: Exception) -> int:
    print(f"keytrio ca: {exc}", file=sys.stderr)
    return 2


def _init(args: argparse.Namespace) -> int:
    try:
        ca = Authority.init(args.dir, common_name=args.name, default_layout=not args.bare,
                            server_ips=tuple(args.ip or ["127.0.0.1"]), server_dns=tuple(args.dns or ["localhost"]))
    except (CaError, OSError) as exc:
        return _fail(exc)
    print(f"CA created in {ca.dir}")
    for item in ca.list():
        print(f"  {item.kind:<10} {item.cert.name}  {item.key.name}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        ca = Authority(args.dir)
        if args.server:
            item = ca.issue(args.server, "server", ips=tuple(args.ip), dns=tuple(args.dns), days=args.days)
        elif args.notifier:
            item = ca.issue(args.notifier, "revocation", days=args.days)
        else:
            item = ca.issue(args.client, "client", days=args.days)
    except (CaError, OSError) as exc:
        return _fail(exc)
    print(f"{item.cert}\n{item.key}")
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        items = Authority(args.dir).list()
    except (CaError, OSError) as exc:
        return _fail(exc)
    print(format_table(
        ("NAME", "KIND", "SERIAL", "EXPIRES", "STATE"),
        [(i.name, i.kind, str(i.serial), _when(i.not_after), "revoked" if i.revoked else "valid") for i in items]))
    return 0


def _when(iso: str) -> str:
    try:
        return datetime.datetime.fromisoformat(iso).astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns as wide as their widest cell (names and serials vary in length), two spaces apart."""
    widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in (header, *rows))


def _revoke(args: argparse.Namespace) -> int:
    try:
        item = Authority(args.dir).revoke(args.what)
    except (CaError, OSError) as exc:
        return _fail(exc)
    print(f"revoked {item.name} (serial {item.serial}); CRL rewritten: {args.dir / 'cacrl.pem'}")
    return 0
