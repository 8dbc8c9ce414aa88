"""``keytrio agent --config F`` and ``keytrio agent --print-default-config``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from keytrio.actors.agent import config as agent_config
from keytrio.actors.agent.actor import Agent, AgentConfigError
from keytrio.actors.agent.registration import RegistrationError
from keytrio.actors.common.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``agent`` verb to the top-level ``keytrio`` parser."""
    p = subparsers.add_parser("agent", help="run the agent of an attested machine (needs a TPM)")
    p.add_argument("--config", type=Path, default=None, help="TOML configuration file ([agent] table)")
    p.add_argument("--print-default-config", action="store_true", help="print a commented default config and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.print_default_config:
        sys.stdout.write(agent_config.default_text())
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = agent_config.load(args.config)
        agent = Agent(cfg)
    except (ConfigError, AgentConfigError) as exc:
        print(f"keytrio agent: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_run_until_signalled, agent)
    except RegistrationError as exc:
        print(f"keytrio agent: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_until_signalled(agent: Agent) -> None:
    """Run the agent; SIGTERM/SIGINT cancel it, which is its clean shutdown."""
    failure: BaseException | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal failure
                try:
                    await agent.run()
                except RegistrationError as exc:
                    failure = exc
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            async for signum in signals:
                logging.getLogger("keytrio.agent").info("event=shutdown signal=%s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    if failure is not None:
        raise failure
