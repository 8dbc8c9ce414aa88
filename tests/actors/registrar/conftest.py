"""Fixtures of the registrar's API tests (v2 and v3): software TPMs and a registrar config."""

from __future__ import annotations

import pytest

from tests.actors.registrar_support import SoftTpm, registrar_config


@pytest.fixture(scope="module")
def softs() -> list[SoftTpm]:
    return [SoftTpm.new() for _ in range(3)]


@pytest.fixture
def config(pki, tmp_path):
    return registrar_config(pki, tmp_path / "registrar")
