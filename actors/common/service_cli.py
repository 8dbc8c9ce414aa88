"""The command-line shape shared by the server actors (registrar, verifier):

    keytrio ACTOR [--config F] [--log-level L] [--log-format text|json]   run until SIGTERM/SIGINT
    keytrio ACTOR --print-default-config
    keytrio ACTOR db upgrade|current [--config F]

Without ``--config`` the file ``/etc/keytrio/ACTOR.toml`` is read if it exists (the directory can
be moved with ``KEYTRIO_CONFIG_DIR``); otherwise the defaults and ``KEYTRIO_ACTOR_*`` apply.
``db upgrade`` migrates the actor's database to this version's schema (what the actor also does at
start unless ``auto_migrate_db = false``); ``db current`` prints its revision and the newest.
A start-up failure is one line on stderr and an exit code of :class:`~startup.Exit`.
Each actor supplies a :class:`ServiceSpec` whose ``load`` imports its modules lazily, so that
``keytrio --help`` does not import every actor.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from keytrio.actors.common import logs, startup
from keytrio.actors.common.config import CONFIG_DIR_ENV, DEFAULT_CONFIG_DIR, ConfigError, default_path
from keytrio.actors.common.startup import Exit, StartupError

log = logging.getLogger("keytrio.cli")


@dataclass(frozen=True)
class ServiceParts:
    load_config: Callable[..., Any]  # (path | None) -> Config
    default_config: Callable[[], str]
    resolve: Callable[[Any], Any]  # Config -> Settings (database_url, data_dir, config)
    make_actor: Callable[[Any], Any]  # Config -> an object with async run(task_status=...)
    migrations: Any
    tls_files: Callable[[Any], list[tuple[str, Path]]] = lambda _config: []  # Config -> (option, path)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    help: str
    load: Callable[[], ServiceParts]


def config_epilog(actor: str) -> str:
    """The --help epilog of an actor verb: where its configuration comes from, its exit codes."""
    return textwrap.dedent(f"""\
        configuration: --config FILE, else {DEFAULT_CONFIG_DIR}/{actor}.toml if it exists
        (directory overridden by ${CONFIG_DIR_ENV}); every key also as KEYTRIO_{actor.upper()}_<KEY>.

        """) + startup.exit_codes_epilog()


def register_service(subparsers: argparse._SubParsersAction, spec: ServiceSpec) -> None:
    p = subparsers.add_parser(spec.name, help=spec.help, epilog=config_epilog(spec.name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path,
                   help=f"TOML configuration file (default {DEFAULT_CONFIG_DIR}/{spec.name}.toml if present)")
    p.add_argument("--print-default-config", action="store_true",
                   help="print the commented default configuration and exit")
    logs.add_options(p)
    p.set_defaults(func=lambda args: _main(spec, args))
    sub = p.add_subparsers(dest="command", metavar="db")
    db = sub.add_parser("db", help="database schema: upgrade to this version, or show the revision")
    db.add_argument("action", choices=("upgrade", "current"))
    # SUPPRESS: a --config given before `db` is kept when none follows it
    db.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML configuration file")
    db.set_defaults(func=lambda args: _db_main(spec, args))


def config_path(actor: str, given: Path | None) -> Path | None:
    """``--config`` if given, else the default file if it exists."""
    return given if given is not None else default_path(actor)


def fail(prog: str, error: StartupError, fmt: str = "text") -> int:
    """Print ``error`` as the one line of a failed start; returns its exit code."""
    logs.emit_failure(error.line(prog), fmt, code=int(error.code))
    return int(error.code)


def config_failure(actor: str, path: Path | None, exc: ConfigError) -> StartupError:
    where = f" {path}" if path is not None else ""
    return StartupError(Exit.CONFIG, f"invalid configuration{where}: " + "; ".join(exc.problems),
                        f"fix the file or KEYTRIO_{actor.upper()}_* (--print-default-config lists every option)")


def _db_main(spec: ServiceSpec, args: argparse.Namespace) -> int:
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

    from keytrio.actors.common.migrations import SchemaOutOfDate
    from keytrio.actors.common.store import db_command

    prog = f"keytrio {spec.name} db"
    parts = spec.load()
    logs.setup(args.log_level, args.log_format)
    path = config_path(spec.name, getattr(args, "config", None))
    try:
        settings = parts.resolve(parts.load_config(path))
    except ConfigError as exc:
        return fail(prog, config_failure(spec.name, path, exc), args.log_format)
    try:
        print(db_command(args.action, settings.database_url, parts.migrations,
                         data_dir=None if settings.config.database_url else settings.data_dir))
    except SchemaOutOfDate as exc:
        what, _, fix = str(exc).partition(": ")
        return fail(prog, StartupError(Exit.SCHEMA, what, fix), args.log_format)
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        return fail(prog, StartupError(Exit.CONFIG, f"no database driver for database_url ({exc})",
                                       "install it (PostgreSQL: pip install 'keytrio[postgresql]') or fix "
                                       "database_url"), args.log_format)
    except OSError as exc:  # the SQLite file's own checks: a directory, a name too long, no access
        return fail(prog, StartupError(Exit.DATABASE, f"cannot open the SQLite database: {exc}",
                                       "check the path of database_url (or data_dir)"), args.log_format)
    except SQLAlchemyError as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        return fail(prog, StartupError(Exit.DATABASE, f"database unreachable: {reason}",
                                       "start the database server or fix database_url"), args.log_format)
    return 0


def _main(spec: ServiceSpec, args: argparse.Namespace) -> int:
    parts = spec.load()
    if args.print_default_config:
        sys.stdout.write(parts.default_config())
        return 0
    prog = f"keytrio {spec.name}"
    logs.setup(args.log_level, args.log_format)
    path = config_path(spec.name, args.config)
    try:
        config = parts.load_config(path)
        files = parts.tls_files(config)
        startup.check_readable(files)  # a missing TLS file, or a key open to others, is a TLS failure
        startup.check_keys(files)
        actor = parts.make_actor(config)
    except ConfigError as exc:
        return fail(prog, config_failure(spec.name, path, exc), args.log_format)
    except StartupError as exc:
        return fail(prog, exc, args.log_format)
    log.debug("event=config actor=%s path=%s", spec.name, path or "none (defaults)")
    try:
        trio.run(run_until_signal, actor)
    except BaseException as exc:
        error = startup.find(exc)
        if error is None:
            raise  # a bug: the traceback is the report (exit 1)
        return fail(prog, error, args.log_format)
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
