"""The command-line shape shared by the server actors (registrar, verifier):

    keytrio ACTOR --config F            run in the foreground until SIGTERM/SIGINT
    keytrio ACTOR --print-default-config
    keytrio ACTOR db upgrade|current --config F

``db upgrade`` migrates the actor's database to this version's schema (what the actor also does at
start unless ``auto_migrate_db = false``); ``db current`` prints its revision and the newest.
Each actor supplies a :class:`ServiceSpec` whose ``load`` imports its modules lazily, so that
``keytrio --help`` does not import every actor.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from keytrio.actors.common.config import ConfigError


@dataclass(frozen=True)
class ServiceParts:
    load_config: Callable[..., Any]  # (path | None) -> Config
    default_config: Callable[[], str]
    resolve: Callable[[Any], Any]  # Config -> Settings (database_url, data_dir, config)
    make_actor: Callable[[Any], Any]  # Config -> an object with async run(task_status=...)
    migrations: Any


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    help: str
    load: Callable[[], ServiceParts]


def register_service(subparsers: argparse._SubParsersAction, spec: ServiceSpec) -> None:
    p = subparsers.add_parser(spec.name, help=spec.help)
    p.add_argument("--config", type=Path, help="TOML configuration file (see --print-default-config)")
    p.add_argument("--print-default-config", action="store_true",
                   help="print the commented default configuration and exit")
    p.set_defaults(func=lambda args: _main(spec, args))
    sub = p.add_subparsers(dest="command", metavar="db")
    db = sub.add_parser("db", help="database schema: upgrade to this version, or show the revision")
    db.add_argument("action", choices=("upgrade", "current"))
    # SUPPRESS: a --config given before `db` is kept when none follows it
    db.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML configuration file")
    db.set_defaults(func=lambda args: _db_main(spec, args))


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _db_main(spec: ServiceSpec, args: argparse.Namespace) -> int:
    from keytrio.actors.common.migrations import SchemaOutOfDate
    from keytrio.actors.common.store import db_command

    parts = spec.load()
    try:
        settings = parts.resolve(parts.load_config(getattr(args, "config", None)))
    except ConfigError as exc:
        print(f"keytrio {spec.name}: {exc}", file=sys.stderr)
        return 2
    _logging()
    try:
        print(db_command(args.action, settings.database_url, parts.migrations,
                         data_dir=None if settings.config.database_url else settings.data_dir))
    except SchemaOutOfDate as exc:
        print(f"keytrio {spec.name}: {exc}", file=sys.stderr)
        return 1
    return 0


def _main(spec: ServiceSpec, args: argparse.Namespace) -> int:
    parts = spec.load()
    if args.print_default_config:
        sys.stdout.write(parts.default_config())
        return 0
    try:
        actor = parts.make_actor(parts.load_config(args.config))
    except ConfigError as exc:
        print(f"keytrio {spec.name}: {exc}", file=sys.stderr)
        return 2
    _logging()
    trio.run(run_until_signal, actor)
    return 0


async def run_until_signal(actor: Any) -> None:
    """Run ``actor`` until SIGTERM/SIGINT, which cancel it: a clean shutdown (requests finish,
    the database closes)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
