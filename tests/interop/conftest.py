"""Interop fixtures: one upstream Keylime 7.14.3 (verifier + registrar) per session; see support.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.support import Upstream, bring_down, bring_up, require_tools


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: runs against upstream Keylime 7.14.3 (real processes)")


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    require_tools()
    # not under pytest's basetemp: concurrent pytest sessions rotate /tmp/pytest-of-<user> (keeping
    # three) and can delete it while upstream still runs from it
    directory = Path(tempfile.mkdtemp(prefix="keytrio-keylime-"))
    up: Upstream | None = None
    try:
        # quote_interval 1 s keeps the attestation-count and Invalid Quote checks short
        up = bring_up(directory, {"KL_QUOTE_INTERVAL": "1"})
        yield up
    finally:
        if up is not None:
            bring_down(up.dir, up.groups)
        shutil.rmtree(directory, ignore_errors=True)
