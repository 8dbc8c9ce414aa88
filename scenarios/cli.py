"""The `scenario` and `testbed` verbs of the `keytrio` command.

They plug into actors/cli.py through the `keytrio.verbs` entry-point group, so a service verb
(`keytrio verifier ...`) never imports the testbed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio

DEFAULT_SEED = 20261128  # scenarios.runner.DEFAULT_SEED (not imported: keeps `keytrio` start cheap)


def _scenario_list(args: argparse.Namespace) -> int:
    import shutil
    import textwrap

    from keytrio.scenarios import runner

    found = sorted(runner.discover().items())
    indent = max(len(name) for name, _ in found) + 2
    # whole summaries, wrapped under their column (at least 40 columns of text on a narrow terminal)
    width = max(shutil.get_terminal_size((100, 24)).columns, indent + 40)
    for name, sc in found:
        print(textwrap.fill(sc.summary, width, initial_indent=f"{name:<{indent}}",
                            subsequent_indent=" " * indent, break_on_hyphens=False, break_long_words=False))
    return 0


def _scenario_run(args: argparse.Namespace) -> int:
    from keytrio.scenarios import runner

    if args.list:
        return _scenario_list(args)
    try:
        ok = trio.run(lambda: runner.run_scenarios(
            args.names, base_dir=args.dir, keep=args.keep, seed=args.seed, json_path=args.json,
            report_dir=args.report))
    except KeyError as exc:
        print(f"keytrio scenario run: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0 if ok else 1


#: the most machines ``testbed up`` starts (each is an swtpm process and an agent); the simulated
#: agents of bench.sim_fleet are the way to thousands
MAX_MACHINES = 1000
#: the verifier's quote_interval when ``testbed up`` runs push agents (the push scenarios' too)
PUSH_QUOTE_INTERVAL = 1.0
#: seconds between a waiting push agent's retries at most (it waits for `tenant add --push`)
PUSH_BACKOFF_MAX = 5.0


def _machine_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= MAX_MACHINES:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_MACHINES}, not {value}")
    return value


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _testbed_up(args: argparse.Namespace) -> int:
    import json

    if args.agents + args.push_agents > MAX_MACHINES:
        print(f"keytrio testbed up: error: --agents and --push-agents: {args.agents + args.push_agents} "
              f"machines, at most {MAX_MACHINES} together", file=sys.stderr)
        return 2

    from keytrio.testbed.world import Testbed

    # push agents: a verifier serving both models at the push scenarios' interval (a push agent is
    # told to wait whole seconds, at least 1, whatever the interval)
    push = {"verifier_options": {"mode": "both"}, "quote_interval": PUSH_QUOTE_INTERVAL} if args.push_agents else {}

    async def up() -> None:
        tb = Testbed(args.dir, machines=args.agents, seed=args.seed, **push)
        # SIGINT (Ctrl-C) and SIGTERM both tear the testbed down through cancellation, so agents
        # stop, every swtpm gets TPM2_Shutdown(CLEAR) and databases close.
        # The signals are watched from the first moment: a Ctrl-C while the machines start (many
        # swtpms take a while) cancels the start, which tears down what was started.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                await nursery.start(tb.run)
                if args.push_agents:
                    # a push agent retries until it is enrolled: at most every PUSH_BACKOFF_MAX s here
                    # (the testbed's own 1 s would print a line a second per agent while you type)
                    await tb.add_machines(args.push_agents, behind_nat=True, mode="push",
                                          backoff_max_delay=PUSH_BACKOFF_MAX)
                print(json.dumps(tb.describe(), indent=2), flush=True)
                print(f"tenant configuration: {tb.tenant_config}; for example:", file=sys.stderr)
                for line in tb.tenant_commands():
                    print(f"  {line}", file=sys.stderr)
                print("testbed running; Ctrl-C tears it down", file=sys.stderr, flush=True)
        print("testbed stopped", file=sys.stderr, flush=True)

    try:
        trio.run(up)
    except BaseException as exc:
        from keytrio.actors.common import startup

        error = startup.find(exc)
        if error is None:
            raise
        print(error.line("keytrio testbed up"), file=sys.stderr, flush=True)
        return int(error.code)
    return 0


def _tpm_start(args: argparse.Namespace) -> int:
    from keytrio.testbed import swtpm_detached

    tcti = trio.run(lambda: swtpm_detached.start_detached(args.dir, banks=tuple(args.banks.split(","))))
    print(tcti)
    return 0


def _tpm_stop(args: argparse.Namespace) -> int:
    from keytrio.testbed import swtpm_detached

    stopped = trio.run(lambda: swtpm_detached.stop_detached(args.dir))
    if not stopped:
        print(f"keytrio testbed tpm stop: no running swtpm in {args.dir}", file=sys.stderr)
        return 1
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the scenario and testbed verbs to the `keytrio` parser (entry point `keytrio.verbs`)."""
    sc = verbs.add_parser("scenario", help="run attestation scenarios on software TPMs")
    sc_verbs = sc.add_subparsers(dest="scenario_verb", metavar="ACTION", required=True)
    run = sc_verbs.add_parser("run", help="run scenarios (all of them when none is named)")
    run.add_argument("names", nargs="*", metavar="NAME", help="scenario names (see --list)")
    run.add_argument("--list", action="store_true", help="list the scenarios and exit")
    run.add_argument("--dir", type=Path, help="keep the run's files (TPM state, logs) in this directory")
    run.add_argument("--keep", action="store_true", help="keep the temporary directory even on success")
    run.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the run (default %(default)s)")
    run.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON to FILE")
    run.add_argument("--report", type=Path, metavar="DIR", help="write report.json + report.html into DIR")
    run.set_defaults(func=_scenario_run)
    lst = sc_verbs.add_parser("list", help="list the scenarios")
    lst.set_defaults(func=_scenario_list)

    tb = verbs.add_parser("testbed", help="software TPMs and simulated machines for exploration")
    tb_verbs = tb.add_subparsers(dest="testbed_verb", metavar="PART", required=True)
    up = tb_verbs.add_parser(
        "up", help="start a CA, registrar, verifier and N agents; Ctrl-C stops them",
        description="Start a CA, registrar, verifier and N agents (swtpm) and keep them running until "
                    "Ctrl-C. Writes DIR/tenant.toml (with the EK trust store DIR/ek-trust-store) and "
                    "prints the tenant commands that use it, e.g. keytrio tenant add -c DIR/tenant.toml ID "
                    "(keytrio tenant add --push -c DIR/tenant.toml ID for a push agent).")
    up.add_argument("--agents", type=_machine_count, default=1,
                    help=f"number of machines with a pull-mode agent, 0 to {MAX_MACHINES} (default %(default)s)")
    up.add_argument("--push-agents", type=_machine_count, default=0, metavar="N",
                    help="also N push-mode machines (API v3.0), each behind a NAT gateway: they dial out, "
                         "nothing dials in; the verifier then serves pull and push agents (mode both) at a "
                         f"{PUSH_QUOTE_INTERVAL:g} s quote interval (default 0)")
    up.add_argument("--dir", type=Path, required=True, help="the testbed's directory (kept)")
    up.add_argument("--seed", type=int, default=0, help="seed of machine contents and agent ids")
    up.set_defaults(func=_testbed_up)
    tpm = tb_verbs.add_parser("tpm", help="a standalone swtpm instance")
    tpm_verbs = tpm.add_subparsers(dest="tpm_verb", metavar="ACTION", required=True)
    start = tpm_verbs.add_parser(
        "start", help="provision (if needed) and start an swtpm in DIR; prints its TCTI string"
    )
    start.add_argument("--dir", type=Path, required=True, help="the TPM's state directory")
    start.add_argument(
        "--banks", default="sha1,sha256,sha384",
        help="active PCR banks when provisioning (default %(default)s)",
    )
    start.set_defaults(func=_tpm_start)
    stop = tpm_verbs.add_parser("stop", help="send TPM2_Shutdown(CLEAR) and stop the swtpm in DIR")
    stop.add_argument("--dir", type=Path, required=True, help="the TPM's state directory")
    stop.set_defaults(func=_tpm_stop)



def main(argv: list[str] | None = None) -> int:
    """Kept for `python -m keytrio.scenarios.cli`; the command itself is keytrio.actors.cli."""
    from keytrio.actors.cli import main as keytrio_main

    return keytrio_main(argv)


if __name__ == "__main__":
    sys.exit(main())
