"""Actor verbs of the `keytrio` command (registrar, verifier, agent, tenant, ca, policy).

`scenarios/cli.py` owns the top-level parser and hands these verbs here. A verb is added to
`register` only once it works; each actor's own cli module defines its options.
"""

from __future__ import annotations

import argparse

from actors.agent import cli as agent_cli
from actors.ca import cli as ca_cli
from actors.policy import cli as policy_cli
from actors.registrar import cli as registrar_cli
from actors.tenant import cli as tenant_cli
from actors.verifier import cli as verifier_cli


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the actor verbs to the top-level parser."""
    registrar_cli.register(subparsers)
    verifier_cli.register(subparsers)
    agent_cli.register(subparsers)
    ca_cli.register(subparsers)
    tenant_cli.register(subparsers)
    policy_cli.register(subparsers)
