"""Shared fixtures: private swtpm instances and an opened TPM access layer on them.

- ``swtpm``: a running swtpm (banks sha1+sha256+sha384, unix socket) on a private copy of one
  session-wide provisioned state: every test gets its own TPM, but all clones share the same EKs.
- ``swtpm_factory``: ``await swtpm_factory(banks=..., transport=..., fresh=True)`` makes more
  running instances; ``fresh=True`` (default) provisions a new TPM (distinct EKs, ~0.7 s),
  ``fresh=False`` clones the session template (fast, same EKs as ``swtpm``).
- ``swtpm_ca_dir``: the session's private swtpm local CA; every fixture TPM's EK certs chain to it
  (``testbed.swtpm.ek_ca_certs(sw.state_dir)`` lists the PEM files).
- ``tpm``: an opened ``actors.agent.tpm.Tpm`` on ``swtpm``. swtpm serves one connection at a time,
  so while ``tpm`` is open, tpm2-tools calls against the same swtpm block: use one or the other.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from keytrio.testbed import swtpm as swtpm_mod


def _require_swtpm() -> None:
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install swtpm swtpm-tools)")


@pytest.fixture(scope="session")
def swtpm_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_swtpm()
    d = tmp_path_factory.mktemp("swtpm-localca")
    swtpm_mod.init_local_ca(d)
    return d


@pytest.fixture(scope="session")
def swtpm_template(tmp_path_factory: pytest.TempPathFactory, swtpm_ca_dir: Path) -> Path:
    """One provisioned (never started) state dir per session, cloned per test."""
    d = tmp_path_factory.mktemp("swtpm-template")
    swtpm_mod.provision(d, banks=swtpm_mod.DEFAULT_BANKS, ca_dir=swtpm_ca_dir)
    return d


@pytest.fixture
async def swtpm(tmp_path: Path, swtpm_template: Path) -> AsyncIterator[swtpm_mod.Swtpm]:
    d = tmp_path / "swtpm"
    swtpm_mod.copy_state(swtpm_template, d)
    async with swtpm_mod.swtpm_running(d) as sw:
        yield sw


SwtpmFactory = Callable[..., Awaitable[swtpm_mod.Swtpm]]


@pytest.fixture
async def swtpm_factory(
    tmp_path: Path, swtpm_template: Path, swtpm_ca_dir: Path
) -> AsyncIterator[SwtpmFactory]:
    counter = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            *,
            banks: Sequence[str] = swtpm_mod.DEFAULT_BANKS,
            transport: str = "unix",
            fresh: bool = True,
        ) -> swtpm_mod.Swtpm:
            d = tmp_path / f"swtpm-{next(counter)}"
            if not fresh:
                if tuple(banks) != swtpm_mod.DEFAULT_BANKS:
                    raise ValueError("fresh=False clones the template, which has the default banks")
                swtpm_mod.copy_state(swtpm_template, d)
            return await stack.enter_async_context(
                swtpm_mod.swtpm_running(d, banks=banks, transport=transport, ca_dir=swtpm_ca_dir)
            )

        yield make


@pytest.fixture
async def tpm(swtpm: swtpm_mod.Swtpm):  # -> actors.agent.tpm.Tpm
    from keytrio.actors.agent.tpm import Tpm

    async with await Tpm.open(swtpm.tcti) as t:
        yield t
