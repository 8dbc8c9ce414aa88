"""The `keytrio` command: scenario and testbed verbs here, every other verb from actors/cli.py."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from actors import cli as actors_cli


def _scenario_run(args: argparse.Namespace) -> int:
    from scenarios import runner

    if args.list:
        for name, sc in sorted(runner.discover().items()):
            print(f"{name:<28} {sc.summary}")
        return 0
    try:
        ok = trio.run(lambda: runner.run_scenarios(args.names, base_dir=args.dir, keep=args.keep))
    except KeyError as exc:
        print(f"keytrio scenario run: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def _tpm_start(args: argparse.Namespace) -> int:
    from testbed import swtpm

    tcti = trio.run(lambda: swtpm.start_detached(args.dir, banks=tuple(args.banks.split(","))))
    print(tcti)
    return 0


def _tpm_stop(args: argparse.Namespace) -> int:
    from testbed import swtpm

    stopped = trio.run(lambda: swtpm.stop_detached(args.dir))
    if not stopped:
        print(f"keytrio testbed tpm stop: no running swtpm in {args.dir}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keytrio",
        description="Keylime-compatible remote attestation on Trio, with a software-TPM testbed.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    sc = verbs.add_parser("scenario", help="run attestation scenarios on software TPMs")
    sc_verbs = sc.add_subparsers(dest="scenario_verb", metavar="ACTION", required=True)
    run = sc_verbs.add_parser("run", help="run scenarios (all of them when none is named)")
    run.add_argument("names", nargs="*", metavar="NAME", help="scenario names (see --list)")
    run.add_argument("--list", action="store_true", help="list the scenarios and exit")
    run.add_argument("--dir", type=Path, help="keep the run's files (TPM state, logs) in this directory")
    run.add_argument("--keep", action="store_true", help="keep the temporary directory even on success")
    run.set_defaults(func=_scenario_run)

    tb = verbs.add_parser("testbed", help="software TPMs and simulated machines for exploration")
    tb_verbs = tb.add_subparsers(dest="testbed_verb", metavar="PART", required=True)
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

    actors_cli.register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The TSS logs expected TPM errors (probing, refused activations) to stderr; keytrio reports
    # its own errors. An operator can still ask for the TSS log by setting TSS2_LOG.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
