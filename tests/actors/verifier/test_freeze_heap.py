"""The verifier's start-up heap is frozen (gc.freeze) when its own process runs it
(``workers.make_service``: ``keytrio verifier`` and the benchmark's server), and not when a test or
an embedder runs a Verifier: freezing is process-wide and keeps whatever is alive for good."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import trio

from keytrio.actors.verifier.config import load_config
from keytrio.actors.verifier.workers import make_service
from tests.actors.verifier_support import start_verifier, verifier_options


async def test_service_freezes_its_heap_once_serving(pki: Any, tmp_path: Path) -> None:
    gc.unfreeze()
    service = make_service(load_config(env={}, overrides=verifier_options(pki, tmp_path)))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert gc.get_freeze_count() > 0
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()  # give the test process its heap back


async def test_embedded_verifier_leaves_the_heap_alone(pki: Any, tmp_path: Path) -> None:
    gc.unfreeze()
    async with trio.open_nursery() as nursery:
        running = await start_verifier(nursery, pki, tmp_path)
        assert gc.get_freeze_count() == 0
        running.scope.cancel()
        await running.admin.aclose()
