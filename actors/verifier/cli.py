"""``keytrio verifier --config F`` (and ``--print-default-config``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from actors.common.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``verifier`` verb to the top-level ``keytrio`` parser."""
    p = subparsers.add_parser("verifier", help="run the verifier (continuous attestation of enrolled agents)")
    p.add_argument("--config", type=Path, help="TOML configuration file (see --print-default-config)")
    p.add_argument(
        "--print-default-config",
        action="store_true",
        help="print the commented default configuration and exit",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from actors.verifier.actor import Verifier
    from actors.verifier.config import default_config, load_config

    if args.print_default_config:
        sys.stdout.write(default_config())
        return 0
    try:
        verifier = Verifier(load_config(args.config))
    except ConfigError as exc:
        print(f"keytrio verifier: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(_run_until_signal, verifier)
    return 0


async def _run_until_signal(verifier: object) -> None:
    # SIGTERM/SIGINT cancel the actor: a clean shutdown (requests finish, the database closes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(verifier.run)  # type: ignore[attr-defined]
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
