"""``keytrio verifier [--config F]`` / ``--print-default-config`` / ``db upgrade|current`` (see service_cli)."""

from __future__ import annotations

import argparse

from keytrio.actors.common.service_cli import ServiceParts, ServiceSpec, register_service


def _load() -> ServiceParts:
    from keytrio.actors.common.server_options import tls_files
    from keytrio.actors.verifier.config import TLS_OPTIONS, default_config, load_config, resolve
    from keytrio.actors.verifier.migrations import MIGRATIONS
    from keytrio.actors.verifier.workers import make_service

    return ServiceParts(load_config, default_config, resolve, make_service, MIGRATIONS,
                        tls_files=lambda config: tls_files(config, TLS_OPTIONS))


SPEC = ServiceSpec("verifier", "run the verifier (continuous attestation of enrolled agents)", _load)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``verifier`` verb to the top-level ``keytrio`` parser."""
    register_service(subparsers, SPEC)
