"""The IMA hook's exit for a poll with nothing new (AgentIma.nothing_new, protocol.ima_eval.nothing_new)
against the general path (AgentIma.for_boot + AgentIma.__call__, which runs evaluate_ima): the same
failures (ids, contexts, severities), the same next entry, an equal progress (so the monitor writes
it, or not, alike: it compares by identity, then equality), the same warnings, the same
observations of lines per poll and the same log records, or the same exception. First at the
hook (the steady case and its near misses, crossed with restored, lagging, other-bank and
hand-made progresses and hooks with no/another policy, check_unquoted, earlier warnings), then
in sequences of polls as a monitor makes them, then through attest.evaluate's one-pass path
against attest._evaluate_general with a real hook. No TPM: the IMA lines are built in software."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keytrio.actors.verifier import attest
from keytrio.actors.verifier.ima import AgentIma
from keytrio.protocol import ima
from keytrio.protocol.evidence import PCR10_CHECKED, PCR10_NOT_CHECKED
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima_eval import ImaProgress
from keytrio.protocol.runtime_policy import RuntimePolicy, load_policy, parse_ima_key, policy_document
from tests.actors.verifier.attest_support import (
    GOOD_PCRS,
    NONCE,
    _good_attest,
    _quote_text,
    _reply,
    _state,
    _target,
)

BANK = "sha256"
PATHS = [f"/usr/bin/tool{i}" for i in range(8)]


def _entry(path: str, bank: str = BANK) -> ima.Entry:
    return ima.build_entry("ima-ng", path, bank, getattr(hashlib, bank)(path.encode()).digest())


def _lines(paths: list[str]) -> str:
    return "".join(ima.format_line(_entry(p)) + "\n" for p in paths)


def _pcr10(paths: list[str], bank: str = BANK) -> bytes:
    return ima.replay([_entry(p) for p in paths], bank)


def _policy(paths: list[str]) -> RuntimePolicy:
    doc = policy_document(meta={"version": 1, "generator": 3},
                          digests={p: [hashlib.sha256(p.encode()).hexdigest()] for p in paths})
    return load_policy(json.dumps(doc).encode())


POLICY = _policy(PATHS)
OTHER_POLICY = _policy(PATHS[:2])  # refuses tool2.. : matters only when lines are judged
EXCLUDING = load_policy(json.dumps(policy_document(
    meta={"version": 1, "generator": 3}, digests={}, excludes=["/usr/bin/.*"])).encode())

P5 = _pcr10(PATHS[:5])  # PCR 10 after the first five lines
P6 = _pcr10(PATHS[:6])
KEY = parse_ima_key(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
BASE = ImaProgress(5, {BANK: P5.hex()}, 1000, 3, 0, ())


class Source:
    """A PolicySource shared by copies (a policy store): what it resolves to can change."""

    def __init__(self, policy: RuntimePolicy | None) -> None:
        self.policy = policy

    def resolve(self, name: str | None, checksum: str | None) -> RuntimePolicy | None:
        return self.policy

    def __deepcopy__(self, memo: dict[int, Any]) -> Source:
        return self


class Observed:
    """lines_per_poll: what was observed, in order."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


PROGRESSES: dict[str, ImaProgress] = {
    "base": BASE,
    "restored": ImaProgress.from_json(json.loads(json.dumps(BASE.to_json()))),
    "restored upper-case hex": ImaProgress.from_json({**BASE.to_json(), "pcrs": {BANK: P5.hex().upper()}}),
    "lagging": dataclasses.replace(BASE, lag=2),
    "boot unknown": dataclasses.replace(BASE, boottime=None, reset_count=None),
    "boottime unknown": dataclasses.replace(BASE, boottime=None),
    "two banks": dataclasses.replace(BASE, pcrs={BANK: P5.hex(), "sha1": "00" * 20}),
    "other bank only": dataclasses.replace(BASE, pcrs={"sha1": "11" * 20}),
    "no pcrs": dataclasses.replace(BASE, pcrs={}),
    "fresh": ImaProgress(boottime=1000, reset_count=3),
    "fresh at zeros": ImaProgress(0, {BANK: "00" * 32}, 1000, 3),
    "learned keys": dataclasses.replace(BASE, learned_keys=(KEY,)),
    "short hex": dataclasses.replace(BASE, pcrs={BANK: "ab" * 20}),
    "at line 6": ImaProgress(6, {BANK: P6.hex()}, 1000, 3, 0, ()),
}

# (list text, first entry, boottime, reset count, quoted PCRs, bank)
POLLS: dict[str, tuple[Any, ...]] = {
    "steady": ("", 5, 1000, 3, {10: P5}, BANK),
    "steady, list None": (None, 5, 1000, 3, {10: P5}, BANK),
    "steady, no boottime": ("", 5, None, 3, {10: P5}, BANK),
    "steady, boot unknown": ("", 5, None, None, {10: P5}, BANK),
    "steady, with PCRs 0-9": ("", 5, 1000, 3, {**{i: bytes(32) for i in range(10)}, 10: P5}, BANK),
    "new boottime": ("", 5, 1001, 3, {10: P5}, BANK),
    "new reset count": ("", 5, 1000, 4, {10: P5}, BANK),
    "new boot, list from 0": (_lines(PATHS[:5]), 0, 1001, 4, {10: P5}, BANK),
    "one new line": (_lines(PATHS[5:6]), 5, 1000, 3, {10: P6}, BANK),
    "one new line, quote behind": (_lines(PATHS[5:6]), 5, 1000, 3, {10: P5}, BANK),
    "PCR 10 moved, no line": ("", 5, 1000, 3, {10: P6}, BANK),
    "PCR 10 zeros": ("", 5, 1000, 3, {10: bytes(32)}, BANK),
    "PCR 10 zeros from 0": ("", 0, 1000, 3, {10: bytes(32)}, BANK),
    "no PCR 10": ("", 5, 1000, 3, {0: bytes(32)}, BANK),
    "entry backwards": ("", 4, 1000, 3, {10: P5}, BANK),
    "entry ahead": ("", 6, 1000, 3, {10: P5}, BANK),
    "entry 0, list empty": ("", 0, 1000, 3, {10: P5}, BANK),
    "entry 0, whole list again": (_lines(PATHS[:5]), 0, 1000, 3, {10: P5}, BANK),
    "a newline only": ("\n", 5, 1000, 3, {10: P5}, BANK),
    "a space only": (" ", 5, 1000, 3, {10: P5}, BANK),
    "a broken line": ("10 zz\n", 5, 1000, 3, {10: P5}, BANK),
    "sha1 bank": ("", 5, 1000, 3, {10: bytes(20)}, "sha1"),
    "sha1 bank, its value": ("", 5, 1000, 3, {10: bytes.fromhex("11" * 20)}, "sha1"),
    "sha384 bank": ("", 5, 1000, 3, {10: bytes(48)}, "sha384"),
    "unknown bank": ("", 5, 1000, 3, {10: P5}, "md5"),
    "short PCR 10": ("", 5, 1000, 3, {10: bytes.fromhex("ab" * 20)}, BANK),
    "PCR 10 as bytearray": ("", 5, 1000, 3, {10: bytearray(P5)}, BANK),
    "PCR 10 as hex text": ("", 5, 1000, 3, {10: P5.hex()}, BANK),
    "PCR 10 as 32 characters": ("", 5, 1000, 3, {10: "ab" * 16}, BANK),
    "steady at line 6": ("", 6, 1000, 3, {10: P6}, BANK),
}

HOOKS: dict[str, dict[str, Any]] = {
    "policy": {},
    "no policy": {"policy": None},
    "other policy": {"policy": OTHER_POLICY},
    "excluding policy": {"policy": EXCLUDING},
    "check_unquoted": {"check_unquoted": True},
    "earlier warnings, tomtou ignored": {"warnings": True, "ignore_tomtou_errors": True},
    "no histogram": {"observed": False},
    "extra keys": {"extra_keys": [KEY]},
}


def _hook(progress: ImaProgress, policy: Any = POLICY, warnings: bool = False, observed: bool = True,
          **opts: Any) -> AgentIma:
    h = AgentIma("a1", Source(policy), "p", None, progress=progress,
                 lines_per_poll=Observed() if observed else None, **opts)  # type: ignore[arg-type]
    if warnings:  # as a previous poll's ToMToU warning leaves them
        h.warnings = [Failure("ima.validation.tomtou", {"line": 3}, Severity.WARNING)]
    return h


def _general(h: AgentIma, poll: tuple[Any, ...]) -> tuple[list[Failure], int]:
    text, entry, boottime, reset, pcrs, bank = poll
    h.for_boot(boottime, reset)
    return h(text, entry, dict(pcrs), bank)


def _with_exit(h: AgentIma, poll: tuple[Any, ...]) -> tuple[list[Failure], int]:
    """What attest._evaluate_fast does with a hook: the exit when PCR 10 is quoted, else general."""
    text, entry, boottime, reset, pcrs, bank = poll
    if 10 in pcrs and h.nothing_new(text, entry, boottime, reset, pcrs[10], bank):
        return [], h.progress.count
    return _general(h, poll)


def _outcome(fn: Any, h: AgentIma, poll: tuple[Any, ...], caplog: pytest.LogCaptureFixture) -> Any:
    before = h.progress
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keytrio.verifier"):
        try:
            fails, nxt = fn(h, poll)
            result: Any = ([dataclasses.astuple(f) for f in fails], nxt)
        except Exception as exc:
            result = ("raised", type(exc).__name__, str(exc))
    after = h.progress
    writes = after is not before and after != before  # the monitor's test for writing ima_progress
    observed = h._lines_per_poll.values if h._lines_per_poll is not None else None  # type: ignore[attr-defined]
    return (result, after.to_json(), after == before, writes, [dataclasses.astuple(w) for w in h.warnings],
            observed, [r.getMessage() for r in caplog.records])


def _compare(progress: ImaProgress, poll: tuple[Any, ...], opts: dict[str, Any],
             caplog: pytest.LogCaptureFixture) -> tuple[Any, bool]:
    general = _outcome(_general, _hook(progress, **opts), poll, caplog)
    h = _hook(progress, **opts)
    before = h.progress
    combined = _outcome(_with_exit, h, poll, caplog)
    assert combined == general
    return general, h.progress is before  # True: the exit took it


STEADY = ["steady", "steady, list None", "steady, no boottime", "steady, boot unknown", "steady, with PCRs 0-9"]
#: the polls that may take the exit, per progress (with a policy and check_unquoted off)
TAKEN: dict[str, list[str]] = {
    "base": STEADY, "restored": STEADY, "learned keys": STEADY,
    "boot unknown": ["steady, boot unknown"],
    "boottime unknown": ["steady, no boottime", "steady, boot unknown"],
    "fresh at zeros": ["PCR 10 zeros from 0"],
    "other bank only": ["sha1 bank, its value"],
    "at line 6": ["steady at line 6"],
}


def test_the_steady_poll_takes_the_exit_with_the_general_result(caplog: pytest.LogCaptureFixture) -> None:
    for poll in STEADY:
        general, took = _compare(BASE, POLLS[poll], {}, caplog)
        assert took, poll
        assert general[0] == ([], 5) and general[2] and not general[3] and general[5] == [0]


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("progress", list(PROGRESSES))
def test_every_near_miss_gives_the_general_result(progress: str, hook: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    taken = [name for name, poll in POLLS.items() if _compare(PROGRESSES[progress], poll, HOOKS[hook], caplog)[1]]
    expected = [] if hook in ("no policy", "check_unquoted") else TAKEN.get(progress, [])
    assert taken == expected


SEQUENCE = [
    ("whole list", (_lines(PATHS[:5]), 0, 1000, 3, {10: P5}, BANK)),
    ("steady", POLLS["steady"]),
    ("steady", POLLS["steady"]),
    ("one new line", POLLS["one new line"]),
    ("steady at 6", POLLS["steady at line 6"]),
    ("two lines, one quoted", (_lines(PATHS[6:8]), 6, 1000, 3, {10: _pcr10(PATHS[:7])}, BANK)),
    ("the rest", (_lines(PATHS[7:8]), 7, 1000, 3, {10: _pcr10(PATHS[:8])}, BANK)),
    ("steady at 8", ("", 8, 1000, 3, {10: _pcr10(PATHS[:8])}, BANK)),
    ("reboot", (_lines(PATHS[:2]), 0, 2000, 4, {10: _pcr10(PATHS[:2])}, BANK)),
    ("steady after reboot", ("", 2, 2000, 4, {10: _pcr10(PATHS[:2])}, BANK)),
    ("boottime dropped", ("", 2, None, 4, {10: _pcr10(PATHS[:2])}, BANK)),
    ("bad line", ("10 zz\n", 2, 2000, 4, {10: _pcr10(PATHS[:3])}, BANK)),
    ("steady again", ("", 2, 2000, 4, {10: _pcr10(PATHS[:2])}, BANK)),
]


@pytest.mark.parametrize("policy_change", [False, True])
def test_a_sequence_of_polls_as_the_monitor_sees_it(policy_change: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Two hooks, one through the general path and one through the exit, poll after poll; the
    monitor's decisions to write ima_progress (identity, then equality, against what it last
    wrote after a success) agree."""
    hooks = {"general": _hook(ImaProgress()), "combined": _hook(ImaProgress())}
    fns = {"general": _general, "combined": _with_exit}
    written: dict[str, Any] = {"general": None, "combined": None}
    exits = 0
    for i, (name, poll) in enumerate(SEQUENCE):
        if policy_change and i == 4:  # the policy reloaded (a PUT) between two polls
            for h in hooks.values():
                h.policies.policy = OTHER_POLICY  # type: ignore[attr-defined]
        before = hooks["combined"].progress
        outs, writes = {}, {}
        for key, h in hooks.items():
            outs[key] = _outcome(fns[key], h, poll, caplog)
            p = h.progress
            writes[key] = p is not written[key] and p != written[key]
            if outs[key][0][0] == []:  # a success: the monitor commits it (and ends on a failure)
                written[key] = p
        assert outs["combined"][:2] == outs["general"][:2] and outs["combined"][4:] == outs["general"][4:], name
        assert writes["combined"] == writes["general"], name
        exits += hooks["combined"].progress is before
    assert exits >= 5


# --- through attest.evaluate ------------------------------------------------------------------------


class RecordingIma(AgentIma):
    """A real hook that also records which of its entry points ran."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls: list[str] = []

    def for_boot(self, boottime: int | None, reset_count: int | None) -> None:
        self.calls.append("for_boot")
        super().for_boot(boottime, reset_count)

    def __call__(self, *a: Any) -> tuple[list[Failure], int]:
        self.calls.append("call")
        return super().__call__(*a)


PCRS = {**GOOD_PCRS, 10: P5}
PCRS_MOVED = {**GOOD_PCRS, 10: P6}
PCRS_NO_10 = {k: v for k, v in GOOD_PCRS.items() if k != 10}


def _quote(pcrs: dict[int, bytes] = PCRS, **kw: Any) -> str:
    return _quote_text(_good_attest(pcrs=pcrs, **kw), pcrs=pcrs)


def _ima_target(progress: ImaProgress = BASE, **opts: Any) -> Any:
    h = RecordingIma("a1", Source(opts.pop("policy", POLICY)), "p", None, progress=progress,
                     lines_per_poll=Observed(), **opts)
    return _target(ima_check=h)


REPLIES: dict[str, dict[str, Any]] = {
    "steady": _reply(_quote(), ima_measurement_list=""),
    "steady, list absent": {k: v for k, v in _reply(_quote()).items() if k != "ima_measurement_list"},
    "steady, no boottime": {k: v for k, v in _reply(_quote(), ima_measurement_list="").items() if k != "boottime"},
    "new boottime": _reply(_quote(), ima_measurement_list="", boottime=1001),
    "new reset count": _reply(_quote(clock=(100_000, 4, 0, 1)), ima_measurement_list=""),
    "one new line": _reply(_quote(PCRS_MOVED), ima_measurement_list=_lines(PATHS[5:6])),
    "PCR 10 moved": _reply(_quote(PCRS_MOVED), ima_measurement_list=""),
    "PCR 10 not quoted": _reply(_quote(PCRS_NO_10), ima_measurement_list=""),
    "entry backwards": _reply(_quote(), ima_measurement_list="", ima_measurement_list_entry=4),
    "entry 0": _reply(_quote(), ima_measurement_list="", ima_measurement_list_entry=0),
    "whole list again": _reply(_quote(), ima_measurement_list=_lines(PATHS[:5]), ima_measurement_list_entry=0),
    "bad nonce": _reply(_quote(nonce=b"another nonce 012345"), ima_measurement_list=""),
    "entry as text": _reply(_quote(), ima_measurement_list="", ima_measurement_list_entry="5"),
}


def _attest_outcome(fn: Any, target: Any, state: Any, reply: Any) -> tuple[Any, ...]:
    target, state, reply = copy.deepcopy((target, state, reply))
    h = target.ima_check
    before = h.progress
    try:
        out: Any = [dataclasses.astuple(f) for f in fn(target, state, reply, NONCE)]
    except Exception as exc:
        out = ("raised", type(exc).__name__, str(exc))
    return (out, dataclasses.asdict(state), h.progress.to_json(), h.progress == before,
            [dataclasses.astuple(w) for w in h.warnings], h._lines_per_poll.values, h.calls)


@pytest.mark.parametrize("hook", ["policy", "no policy", "lagging", "restored", "boot unknown", "other bank"])
def test_evaluate_with_a_real_hook_matches_the_general_path(hook: str) -> None:
    progress = {"lagging": dataclasses.replace(BASE, lag=1), "restored": PROGRESSES["restored upper-case hex"],
                "boot unknown": PROGRESSES["boot unknown"], "other bank": PROGRESSES["other bank only"]}.get(hook, BASE)
    target = _ima_target(progress, **({"policy": None} if hook == "no policy" else {}))
    # the state's entry is the hook's count, or (a state out of step) not
    for state in (_state(), _state(ima_ml_entry=4, pcr10=PCR10_NOT_CHECKED)):
        exits = []
        for name, reply in REPLIES.items():
            general = _attest_outcome(attest._evaluate_general, target, state, reply)
            combined = _attest_outcome(attest.evaluate, target, state, reply)
            assert combined[:-1] == general[:-1], name
            if combined[-1] == [] and general[-1] != []:  # the hook was asked, and its exit answered
                exits.append(name)
            else:
                assert combined[-1] == general[-1], name
        assert exits == (["steady", "steady, list absent", "steady, no boottime"] if hook == "policy" else [])


def test_evaluate_steady_polls_keep_the_progress_object() -> None:
    target, state = _ima_target(), _state()
    first = target.ima_check.progress
    for i in range(3):
        raw = _good_attest(pcrs=PCRS, clock=(100_000 + i, 3, 1, 1))
        reply = _reply(_quote_text(raw, pcrs=PCRS), ima_measurement_list="")
        assert attest.evaluate(target, state, reply, NONCE) == []
    assert target.ima_check.progress is first and target.ima_check.calls == []
    assert target.ima_check._lines_per_poll.values == [0, 0, 0]
    assert state.ima_ml_entry == 5 and state.attestation_count == 7 and state.pcr10 == PCR10_CHECKED


@pytest.mark.parametrize("a, b", list(itertools.combinations(["steady", "one new line", "PCR 10 moved"], 2)))
def test_evaluate_two_polls_in_a_row(a: str, b: str) -> None:
    """After each kind of poll, the next one still agrees (state carried over)."""
    for first, second in ((a, b), (b, a)):
        outs = []
        for fn in (attest._evaluate_general, attest.evaluate):
            target, state = _ima_target(), _state()
            res = []
            for name in (first, second):
                reply = copy.deepcopy(REPLIES[name])
                res.append(([dataclasses.astuple(f) for f in fn(target, state, reply, NONCE)],
                            dataclasses.asdict(state), target.ima_check.progress.to_json()))
            outs.append(res)
        assert outs[0] == outs[1]
