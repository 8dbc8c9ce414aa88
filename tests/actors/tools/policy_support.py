"""Driving `keytrio policy` in-process, for the policy tools' tests and the tenant CLI test."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from keytrio.actors.policy import cli as policy_cli


def policy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keytrio")
    policy_cli.register(p.add_subparsers(dest="verb", required=True))
    return p


def policy(*argv: str | Path) -> tuple[int, str, str]:
    """Run ``keytrio policy ARGV``: (exit code, stdout, stderr)."""
    args = policy_parser().parse_args(["policy", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out, err)
    return code, out.getvalue(), err.getvalue()
