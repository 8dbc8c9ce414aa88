"""Actor verbs of the `keytrio` command (registrar, verifier, agent, tenant, ca, policy).

`scenarios/cli.py` owns the top-level parser and hands these verbs here. A verb is added to
`register` only once it works.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the actor verbs to the top-level parser (none yet: they arrive with their actors)."""
    del subparsers
