"""Scenario registry and runner: runs named scenarios in order, judges them, reports.

A scenario is an async function taking a :class:`Run`; its story is its module's docstring
(preceded by its own docstring when a module holds several scenarios), whose first paragraph is
the one-line summary. It records each step with
``async with run.step("what happens"):`` and usually builds its world with ``run.testbed(...)``.
A step that raises fails the scenario (later steps are not run).

Verdicts come from what the system did: the testbed's :class:`~testbed.observe.Observer` records
per machine the operational states and event ids the verifier reported and the revocation notices
the machine's agent accepted; after the scenario's steps ran, the runner compares those records
with the scenario's :class:`Expect` (``@scenario(name, expect={"m0": Expect(...)})``). A scenario
passes when every step held and the observations match.

Output: on a terminal one live line per scenario (step, elapsed), else plain lines per step; a
summary table; optionally a JSON file and an HTML report (scenarios/report.py).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import pkgutil
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from keytrio.scenarios import markup
from keytrio.testbed.observe import Observer, state_name

ScenarioFn = Callable[["Run"], Awaitable[None]]
DEFAULT_SEED = 20261128


@dataclass(frozen=True)
class Expect:
    """What one machine's observations must be.

    ``events``: exactly these verifier event ids, in order (one per failure the machine was seen in);
    ``notices``: exactly these (failing machine, event id) notices accepted, in any order (None: not
    judged); ``states``: these states must appear in this order among the observed ones (others may
    come between); ``final``: the last observed state (None: not judged)."""

    events: tuple[str, ...] = ()
    notices: tuple[tuple[str, str], ...] | None = None
    states: tuple[int, ...] = ()
    final: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"events": list(self.events),
                "notices": None if self.notices is None else [list(n) for n in self.notices],
                "states": list(self.states), "final": self.final}


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    module: str
    expect: Mapping[str, Expect] | None = None
    #: machines not named in ``expect`` must show no events at all
    others_quiet: bool = True

    @property
    def story(self) -> str:
        """The scenario function's docstring (when several scenarios share a module), then the
        module's docstring: what happens and the expected verdict, in light RST markup."""
        own = inspect.cleandoc(self.fn.__doc__ or "")
        shared = inspect.cleandoc(sys.modules[self.module].__doc__ or "")
        return "\n\n".join(part for part in (own, shared) if part)

    @property
    def summary(self) -> str:
        """The story's first paragraph on one line, without markup: whole sentences, never cut."""
        return markup.plain(markup.first_paragraph(self.story)) or self.name


_REGISTRY: dict[str, Scenario] = {}


def scenario(
    name: str, *, expect: Mapping[str, Expect] | None = None, others_quiet: bool = True
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under ``name``; the module docstring is its story."""

    def wrap(fn: ScenarioFn) -> ScenarioFn:
        if name in _REGISTRY:
            raise ValueError(f"scenario {name!r} registered twice")
        _REGISTRY[name] = Scenario(name, fn, fn.__module__, expect, others_quiet)
        return fn

    return wrap


def discover() -> dict[str, Scenario]:
    """Import every module of the scenarios package so that their scenarios register."""
    import keytrio.scenarios as scenarios

    for info in pkgutil.iter_modules(scenarios.__path__):
        if info.name not in ("cli", "runner", "report", "markup", "support"):
            importlib.import_module(f"{scenarios.__name__}.{info.name}")
    return dict(_REGISTRY)


class StepFailed(Exception):
    """Raised by :meth:`Run.check` when a scenario's expectation does not hold."""


@dataclass
class StepResult:
    title: str
    ok: bool
    seconds: float
    detail: str = ""
    notes: list[str] = field(default_factory=list)


class Display:
    """Plain lines (files, pipes, CI) or one live line per scenario on a terminal."""

    def __init__(self, out: TextIO, live: bool | None = None) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self.name = ""
        self.step = ""
        self.start = 0.0

    def line(self, text: str) -> None:
        if self.live:
            return
        print(text, file=self.out, flush=True)

    def begin(self, name: str, summary: str) -> None:
        self.name, self.step, self.start = name, "starting", time.perf_counter()
        if self.live:
            self.redraw()
        else:
            print(f"scenario {name}: {summary}", file=self.out, flush=True)

    def set_step(self, title: str) -> None:
        self.step = title
        if self.live:
            self.redraw()

    def redraw(self) -> None:
        secs = time.perf_counter() - self.start
        step = self.step if len(self.step) <= 60 else self.step[:57] + "..."
        self.out.write(f"\r\x1b[K  ..    {self.name:<26} {step:<60} {secs:6.1f} s")
        self.out.flush()

    def end(self, name: str, ok: bool, secs: float, why: str) -> None:
        verdict = "PASS" if ok else "FAIL"
        if self.live:
            self.out.write(f"\r\x1b[K  {verdict}  {name:<26} {'' if ok else why[:60]:<60} {secs:6.1f} s\n")
            self.out.flush()
        else:
            print(f"  => {'PASSED' if ok else 'FAILED'} in {secs:.2f} s", file=self.out, flush=True)
            if not ok and why:
                print(f"     {why}", file=self.out, flush=True)


@dataclass
class Run:
    """What a scenario gets: its private directory, seed, observer, and check helpers."""

    scenario: Scenario
    dir: Path
    out: TextIO = sys.stdout
    seed: int = DEFAULT_SEED
    observer: Observer = field(default_factory=Observer)
    display: Display | None = None
    steps: list[StepResult] = field(default_factory=list)
    _notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.display is None:
            self.display = Display(self.out, live=False)

    def testbed(self, machines: int = 1, **options: Any) -> Any:
        """A :class:`testbed.world.Testbed` in this run's directory, with this run's seed/observer."""
        from keytrio.testbed.world import Testbed

        return Testbed(self.dir / "world", machines=machines, seed=self.seed, observer=self.observer, **options)

    @contextlib.asynccontextmanager
    async def step(self, title: str) -> AsyncIterator[None]:
        assert self.display is not None
        start = time.perf_counter()
        self._notes = []
        self.observer.mark(title)
        self.display.set_step(title)
        try:
            yield
        except BaseException as exc:
            secs = time.perf_counter() - start
            detail = _describe(exc)
            self.steps.append(StepResult(title, False, secs, detail, self._notes))
            self.display.line(f"  FAIL  {title}  ({secs:.2f} s)")
            self._flush_notes()
            for line in detail.splitlines():
                self.display.line(f"        {line}")
            raise
        secs = time.perf_counter() - start
        self.steps.append(StepResult(title, True, secs, "", self._notes))
        self.display.line(f"  ok    {title}  ({secs:.2f} s)")
        self._flush_notes()

    def note(self, text: str) -> None:
        """An indented line under the current step (a value seen, a verdict)."""
        self._notes.append(text)

    def _flush_notes(self) -> None:
        assert self.display is not None
        for text in self._notes:
            self.display.line(f"        {text}")
        self._notes = []

    @staticmethod
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise StepFailed(message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StepFailed):
        return str(exc)
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def judge(sc: Scenario, observer: Observer) -> list[str]:
    """Differences between the scenario's expectation and the observations (empty: as expected)."""
    if sc.expect is None:
        return []
    problems: list[str] = []
    for machine, want in sc.expect.items():
        events = observer.events(machine)
        if list(want.events) != events:
            problems.append(f"{machine}: events {events or '[]'}, expected {list(want.events) or '[]'}")
        if want.notices is not None:
            got = sorted(observer.notices(machine))
            if got != sorted(want.notices):
                problems.append(f"{machine}: notices {got or '[]'}, expected {sorted(want.notices) or '[]'}")
        states = observer.states(machine)
        it = iter(states)
        if not all(s in it for s in want.states):  # subsequence test
            problems.append(f"{machine}: states {[state_name(s) for s in states]} do not contain "
                            f"{[state_name(s) for s in want.states]} in order")
        if want.final is not None and (not states or states[-1] != want.final):
            last = state_name(states[-1]) if states else "nothing"
            problems.append(f"{machine}: ended in {last}, expected {state_name(want.final)}")
    if sc.others_quiet:
        for machine in sorted(observer.machines):
            if machine not in sc.expect and observer.events(machine):
                problems.append(f"{machine}: unexpected events {observer.events(machine)}")
    return problems


@dataclass
class ScenarioResult:
    name: str
    summary: str
    story: str
    passed: bool
    seconds: float
    steps: list[StepResult]
    verdict: list[str]  # why it failed (empty when it passed)
    expect: dict[str, Any] | None
    observed: dict[str, Any]
    event_sequences: dict[str, list[str]]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [asdict(s) for s in self.steps]
        return d


async def run_one(sc: Scenario, root: Path, *, seed: int, display: Display) -> ScenarioResult:
    run = Run(sc, root / sc.name, display.out, seed=seed, display=display)
    run.dir.mkdir(parents=True, exist_ok=True)
    display.begin(sc.name, sc.summary)
    start = time.perf_counter()
    why: list[str] = []
    try:
        await sc.fn(run)
    except Exception as exc:
        failed_steps = [s for s in run.steps if not s.ok]
        why.append(f"step failed: {failed_steps[-1].title}: {failed_steps[-1].detail}" if failed_steps
                   else f"outside a step: {_describe(exc)}")
        if not failed_steps:
            display.line(f"  FAIL  (outside a step) {_describe(exc)}")
    else:
        why.extend(judge(sc, run.observer))
        for problem in why:
            display.line(f"  FAIL  verdict: {problem}")
        if not why and sc.expect is not None:
            display.line("  ok    verdict: observed states, events and notices as expected")
    secs = time.perf_counter() - start
    display.end(sc.name, not why, secs, "; ".join(why))
    return ScenarioResult(
        name=sc.name, summary=sc.summary, story=sc.story, passed=not why, seconds=round(secs, 3),
        steps=run.steps, verdict=why,
        expect=None if sc.expect is None else {m: e.to_json() for m, e in sc.expect.items()},
        observed=run.observer.to_json(), event_sequences=run.observer.event_sequences(),
    )


async def _ticker(display: Display) -> None:
    while True:
        await trio.sleep(0.25)
        if display.name:
            display.redraw()


async def run_suite(
    names: list[str],
    *,
    base_dir: Path | None = None,
    keep: bool = False,
    out: TextIO | None = None,
    seed: int = DEFAULT_SEED,
    json_path: Path | None = None,
    report_dir: Path | None = None,
    live: bool | None = None,
) -> list[ScenarioResult]:
    """Run the named scenarios (all when empty) one after another; the results, in order."""
    out = out if out is not None else sys.stdout  # looked up per call: tests capture sys.stdout
    registry = discover()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(sorted(registry))}")
    chosen = [registry[n] for n in names] if names else [registry[n] for n in sorted(registry)]
    if not chosen:
        print("no scenarios to run", file=out, flush=True)
        return []
    root = base_dir or Path(tempfile.mkdtemp(prefix="keytrio-scenarios-"))
    root.mkdir(parents=True, exist_ok=True)
    display = Display(out, live)
    results: list[ScenarioResult] = []
    suite_start = time.perf_counter()
    with _actor_logs(root / "actors.log"):
        async with trio.open_nursery() as nursery:
            if display.live:
                nursery.start_soon(_ticker, display)
            for sc in chosen:
                results.append(await run_one(sc, root, seed=seed, display=display))
                display.name = ""
            nursery.cancel_scope.cancel()
    total = time.perf_counter() - suite_start
    _summary(results, total, out)
    failed = sum(not r.passed for r in results)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(suite_json(results, seed, total), indent=2))
    if report_dir is not None:
        from keytrio.scenarios import report

        written = report.write(report_dir, suite_json(results, seed, total))
        print(f"report: {written}", file=out, flush=True)
    if base_dir is None and not keep and failed == 0:
        shutil.rmtree(root, ignore_errors=True)
    elif failed or keep:
        print(f"files of this run: {root}", file=out, flush=True)
    return results


async def run_scenarios(names: list[str], **options: Any) -> bool:
    """:func:`run_suite`; True when every scenario passed."""
    results = await run_suite(names, **options)
    return bool(results) and all(r.passed for r in results)


def suite_json(results: list[ScenarioResult], seed: int, total: float) -> dict[str, Any]:
    return {
        "seed": seed,
        "seconds": round(total, 3),
        "passed": sum(r.passed for r in results),
        "failed": sum(not r.passed for r in results),
        "scenarios": [r.to_json() for r in results],
    }


def _summary(results: list[ScenarioResult], total: float, out: TextIO) -> None:
    print("", file=out)
    print("scenario summary:", file=out)
    print(f"  {'':4}  {'scenario':<26} {'steps':>5} {'time':>8}  observed events", file=out)
    for r in results:
        events = sorted({e for seq in r.observed["machines"].values() for e in seq["events"]})
        shown = ", ".join(events) if events else "-"
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.name:<26} {len(r.steps):>5} {r.seconds:7.2f}s  {shown[:70]}",
              file=out)
    passed = sum(r.passed for r in results)
    print(f"{passed} passed, {len(results) - passed} failed in {total:.1f} s", file=out, flush=True)


@contextlib.contextmanager
def _actor_logs(path: Path) -> Any:
    """The actors' log lines go to a file of the run, not between the report's lines."""
    root = logging.getLogger("keytrio")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    old_level, old_propagate = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        root.propagate = old_propagate
