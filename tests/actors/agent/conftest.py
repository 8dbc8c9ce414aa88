"""Fixtures of the agent tests (the helpers behind them: tests/actors/agent_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.actors.agent_support import Running, start_agent


@pytest.fixture
async def running(nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any) -> AsyncIterator[Running]:
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti)
    yield r
    await r.stop()
