"""Fixtures of the verifier's tests."""

from __future__ import annotations

import pytest
from trio.testing import MockClock


@pytest.fixture
def clock() -> MockClock:
    # jumps only after 0.3 s of real idleness: sockets and SQLite threads finish first
    return MockClock(autojump_threshold=0.3)
