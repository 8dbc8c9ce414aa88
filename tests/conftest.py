"""Shared fixtures: private swtpm instances and an opened TPM access layer on them.

- ``swtpm``: a running swtpm (banks sha1+sha256+sha384, unix socket) on a private copy of one
  session-wide provisioned state: every test gets its own TPM, but all clones share the same EKs.
- ``swtpm_factory``: ``await swtpm_factory(banks=..., transport=..., fresh=True)`` makes more
  running instances; ``fresh=True`` (default) provisions a new TPM (distinct EKs, ~0.7 s),
  ``fresh=False`` clones the session template (fast, same EKs as ``swtpm``).
- ``swtpm_ca_dir``: the session's private swtpm local CA; every fixture TPM's EK certs chain to it
  (``testbed.swtpm_state.ek_ca_certs(sw.state_dir)`` lists the PEM files).
- ``tpm``: an opened ``actors.agent.tpm.Tpm`` on ``swtpm``. swtpm serves one connection at a time,
  so while ``tpm`` is open, tpm2-tools calls against the same swtpm block: use one or the other.

Under ``CI=true`` a skipped test (or collector) is reported as a failure, and so is an xfail or
xpass: a skip there hides a regression or a missing tool (``./scripts/setup`` installs every one).
Only skips whose reason names something this machine cannot have pass (``CI_ALLOWED_SKIPS``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

from keytrio.testbed import swtpm as swtpm_mod
from keytrio.testbed import swtpm_state

#: skip reasons accepted under CI=true (substring of the reason -> why it cannot exist here)
CI_ALLOWED_SKIPS: dict[str, str] = {
    "/dev/tpmrm0": "a hardware TPM resource manager: test machines have none (swtpm stands in)",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _ci_verdict(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """Why ``report`` must fail under CI, or None."""
    if getattr(report, "wasxfail", None) is not None:
        return f"xfail/xpass is not allowed under CI=true ({report.wasxfail})"
    if not report.skipped:
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        return None
    return f"skipped under CI=true, which allows no skip ({reason}); see tests/conftest.py CI_ALLOWED_SKIPS"


def _fail_under_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not _in_ci():
        return
    why = _ci_verdict(report)
    if why is not None:
        report.outcome = "failed"
        report.longrepr = why
        if hasattr(report, "wasxfail"):
            del report.wasxfail


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _fail_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    _fail_under_ci(outcome.get_result())


def _require_swtpm() -> None:
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed: ./scripts/setup installs it (apt-get install swtpm swtpm-tools)")


@pytest.fixture(scope="session")
def swtpm_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_swtpm()
    d = tmp_path_factory.mktemp("swtpm-localca")
    swtpm_state.init_local_ca(d)
    return d


@pytest.fixture(scope="session")
def swtpm_template(tmp_path_factory: pytest.TempPathFactory, swtpm_ca_dir: Path) -> Path:
    """One provisioned (never started) state dir per session, cloned per test."""
    d = tmp_path_factory.mktemp("swtpm-template")
    swtpm_state.provision(d, banks=swtpm_state.DEFAULT_BANKS, ca_dir=swtpm_ca_dir)
    return d


@pytest.fixture
async def swtpm(tmp_path: Path, swtpm_template: Path) -> AsyncIterator[swtpm_mod.Swtpm]:
    d = tmp_path / "swtpm"
    swtpm_state.copy_state(swtpm_template, d)
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
            banks: Sequence[str] = swtpm_state.DEFAULT_BANKS,
            transport: str = "unix",
            fresh: bool = True,
        ) -> swtpm_mod.Swtpm:
            d = tmp_path / f"swtpm-{next(counter)}"
            if not fresh:
                if tuple(banks) != swtpm_state.DEFAULT_BANKS:
                    raise ValueError("fresh=False clones the template, which has the default banks")
                swtpm_state.copy_state(swtpm_template, d)
            return await stack.enter_async_context(
                swtpm_mod.swtpm_running(d, banks=banks, transport=transport, ca_dir=swtpm_ca_dir)
            )

        yield make


@pytest.fixture
async def tpm(swtpm: swtpm_mod.Swtpm):  # -> actors.agent.tpm.Tpm
    from keytrio.actors.agent.tpm import Tpm

    async with await Tpm.open(swtpm.tcti) as t:
        yield t
