"""``keytrio agent [--config F]`` and ``keytrio agent --print-default-config``.

Without ``--config`` the agent reads ``/etc/keytrio/agent.toml`` if it exists (``KEYTRIO_CONFIG_DIR``
moves the directory). A start-up failure is one line on stderr and an exit code of
actors/common/startup.py (``--help`` lists them).
"""

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
from keytrio.actors.common import logs, startup
from keytrio.actors.common.config import ConfigError
from keytrio.actors.common.service_cli import config_epilog, config_failure, config_path, fail
from keytrio.actors.common.startup import Exit, StartupError

PROG = "keytrio agent"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``agent`` verb to the top-level ``keytrio`` parser."""
    p = subparsers.add_parser("agent", help="run the agent of an attested machine (needs a TPM)",
                              epilog=config_epilog("agent"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="TOML configuration file ([agent] table; default /etc/keytrio/agent.toml if present)")
    p.add_argument("--print-default-config", action="store_true", help="print a commented default config and exit")
    logs.add_options(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.print_default_config:
        sys.stdout.write(agent_config.default_text())
        return 0
    logs.setup(args.log_level, args.log_format)
    path = config_path(agent_config.ACTOR, args.config)
    try:
        cfg = agent_config.load(path)
        # a missing or unreadable CA/CRL file is a TLS failure (12), as for the servers
        startup.check_readable([*(("trusted_client_ca", Path(p)) for p in cfg.trusted_client_ca),
                                *((("crl", Path(cfg.crl)),) if cfg.crl else ())])
        agent = Agent(cfg)
    except StartupError as exc:
        return fail(PROG, exc, args.log_format)
    except ConfigError as exc:
        return fail(PROG, config_failure(agent_config.ACTOR, path, exc), args.log_format)
    except AgentConfigError as exc:
        return fail(PROG, _config_problem(exc), args.log_format)
    try:
        trio.run(_run_until_signalled, agent)
    except BaseException as exc:
        error = startup.find(exc) or _known(exc)
        if error is None:
            raise  # a bug: the traceback is the report (exit 1)
        return fail(PROG, error, args.log_format)
    return 0


def _config_problem(exc: AgentConfigError) -> StartupError:
    return StartupError(Exit.CONFIG, f"invalid configuration: {exc}",
                        "fix the [agent] file or KEYTRIO_AGENT_* (--print-default-config lists every option)")


def _known(exc: BaseException) -> StartupError | None:
    """The agent's own start-up failures that are not StartupError (also inside exception groups)."""
    if isinstance(exc, RegistrationError):
        return StartupError(Exit.REGISTRATION, f"registration failed: {exc}",
                            "check that the registrar runs at registrar_ip:registrar_port and accepts this agent")
    if isinstance(exc, AgentConfigError):
        return _config_problem(exc)
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _known(sub)
            if found is not None:
                return found
    return None


async def _run_until_signalled(agent: Agent) -> None:
    """Run the agent; SIGTERM/SIGINT cancel it, which is its clean shutdown."""
    failure: BaseException | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal failure
                try:
                    await agent.run()
                except (RegistrationError, StartupError) as exc:
                    failure = exc
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            async for signum in signals:
                logging.getLogger("keytrio.agent").info("event=shutdown signal=%s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    if failure is not None:
        raise failure
