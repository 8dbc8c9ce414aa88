"""``keytrio registrar --config F`` (and ``--print-default-config``); ``keytrio registrar db upgrade|current --config F``.

``db upgrade`` migrates the registrar's database to this version's schema (what the actor also does
at start unless ``auto_migrate_db = false``); ``db current`` prints its revision and the newest.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from actors.common.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``registrar`` verb to the top-level ``keytrio`` parser."""
    p = subparsers.add_parser("registrar", help="run the registrar (agent registration and activation)")
    p.add_argument("--config", type=Path, help="TOML configuration file (see --print-default-config)")
    p.add_argument(
        "--print-default-config",
        action="store_true",
        help="print the commented default configuration and exit",
    )
    p.set_defaults(func=main)
    sub = p.add_subparsers(dest="command", metavar="db")
    db = sub.add_parser("db", help="database schema: upgrade to this version, or show the revision")
    db.add_argument("action", choices=("upgrade", "current"))
    # SUPPRESS: a --config given before `db` is kept when none follows it
    db.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML configuration file")
    db.set_defaults(func=db_main)


def db_main(args: argparse.Namespace) -> int:
    from actors.common.migrations import SchemaOutOfDate
    from actors.common.store import db_command
    from actors.registrar.config import load_config, resolve
    from actors.registrar.migrations import MIGRATIONS

    try:
        settings = resolve(load_config(getattr(args, "config", None)))
    except ConfigError as exc:
        print(f"keytrio registrar: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        print(db_command(args.action, settings.database_url, MIGRATIONS,
                         data_dir=None if settings.config.database_url else settings.data_dir))
    except SchemaOutOfDate as exc:
        print(f"keytrio registrar: {exc}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    from actors.registrar.actor import Registrar
    from actors.registrar.config import default_config, load_config

    if args.print_default_config:
        sys.stdout.write(default_config())
        return 0
    try:
        registrar = Registrar(load_config(args.config))
    except ConfigError as exc:
        print(f"keytrio registrar: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(_run_until_signal, registrar)
    return 0


async def _run_until_signal(registrar: object) -> None:
    # SIGTERM/SIGINT cancel the actor: a clean shutdown (requests finish, the database closes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registrar.run)  # type: ignore[attr-defined]
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
