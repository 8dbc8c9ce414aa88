"""Scenario registry and runner: runs named scenarios in order and prints a per-step report.

A scenario is an async function taking a :class:`Run`; it records each step with
``async with run.step("what happens"):``. A step that raises fails the scenario (later steps are
not run); the report says which step failed and why, and the process exits non-zero.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import trio

ScenarioFn = Callable[["Run"], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    module: str

    @property
    def story(self) -> str:
        doc = sys.modules[self.module].__doc__ or ""
        return doc.strip()

    @property
    def summary(self) -> str:
        return self.story.splitlines()[0] if self.story else self.name


_REGISTRY: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under ``name``; the module docstring is its story."""

    def wrap(fn: ScenarioFn) -> ScenarioFn:
        if name in _REGISTRY:
            raise ValueError(f"scenario {name!r} registered twice")
        _REGISTRY[name] = Scenario(name, fn, fn.__module__)
        return fn

    return wrap


def discover() -> dict[str, Scenario]:
    """Import every module of the scenarios package so that their scenarios register."""
    import scenarios

    for info in pkgutil.iter_modules(scenarios.__path__):
        if info.name not in ("cli", "runner"):
            importlib.import_module(f"scenarios.{info.name}")
    return dict(_REGISTRY)


class StepFailed(Exception):
    """Raised by :meth:`Run.check` when a scenario's expectation does not hold."""


@dataclass
class StepResult:
    title: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Run:
    """What a scenario gets: its private directory, the report, and check helpers."""

    scenario: Scenario
    dir: Path
    out: TextIO = sys.stdout
    steps: list[StepResult] = field(default_factory=list)
    _notes: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def step(self, title: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        self._notes = []
        try:
            yield
        except BaseException as exc:
            secs = time.perf_counter() - start
            detail = _describe(exc)
            self.steps.append(StepResult(title, False, secs, detail))
            self._line(f"  FAIL  {title}  ({secs:.2f} s)")
            self._flush_notes()
            for line in detail.splitlines():
                self._line(f"        {line}")
            raise
        secs = time.perf_counter() - start
        self.steps.append(StepResult(title, True, secs))
        self._line(f"  ok    {title}  ({secs:.2f} s)")
        self._flush_notes()

    def note(self, text: str) -> None:
        """An indented line under the current step (a value seen, a verdict)."""
        self._notes.append(text)

    def _flush_notes(self) -> None:
        for text in self._notes:
            self._line(f"        {text}")
        self._notes = []

    @staticmethod
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise StepFailed(message)

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StepFailed):
        return str(exc)
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


async def run_scenarios(
    names: list[str], *, base_dir: Path | None = None, keep: bool = False, out: TextIO = sys.stdout
) -> bool:
    """Run the named scenarios (all when empty) one after another; True when all passed."""
    registry = discover()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(sorted(registry))}")
    chosen = [registry[n] for n in names] if names else [registry[n] for n in sorted(registry)]
    if not chosen:
        print("no scenarios to run", file=out, flush=True)
        return False
    root = base_dir or Path(tempfile.mkdtemp(prefix="keytrio-scenarios-"))
    root.mkdir(parents=True, exist_ok=True)
    results: list[tuple[Scenario, bool, float]] = []
    for sc in chosen:
        print(f"scenario {sc.name}: {sc.summary}", file=out, flush=True)
        run = Run(sc, root / sc.name, out)
        run.dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ok = True
        try:
            await sc.fn(run)
        except Exception as exc:
            ok = False
            if not run.steps or run.steps[-1].ok:
                # failed outside any step: still say why
                print(f"  FAIL  (outside a step) {_describe(exc)}", file=out, flush=True)
        secs = time.perf_counter() - start
        results.append((sc, ok, secs))
        print(f"  => {'PASSED' if ok else 'FAILED'} in {secs:.2f} s", file=out, flush=True)
    passed = sum(ok for _, ok, _ in results)
    failed = len(results) - passed
    print("", file=out)
    print("scenario summary:", file=out)
    for sc, ok, secs in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {sc.name:<28} {secs:7.2f} s", file=out)
    print(f"{passed} passed, {failed} failed", file=out, flush=True)
    if base_dir is None and not keep and failed == 0:
        shutil.rmtree(root, ignore_errors=True)
    elif failed or keep:
        print(f"files of this run: {root}", file=out, flush=True)
    return failed == 0
