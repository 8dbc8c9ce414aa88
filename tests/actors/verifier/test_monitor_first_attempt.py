"""The monitor's steady-state poll makes its first attempt in the loop itself and hands whatever
the retry loop handles to ``Monitor._with_retries`` as that attempt's outcome (monitor.py, the
seventh round of issue 20 item 4). These tests run the real ``Monitor.run`` of a real
``MonitorSet`` on real SQLite under trio's MockClock, with the attestation round scripted (each
attempt's outcome: a good quote, or the exception the round raised), and check what the loop
makes of each outcome: the retries and their backoff in mock seconds, the attempt count in the
failure, the stored states, which failure is recorded for each kind of exception, the poll
metrics, and the request slot held during an attempt.

The poll loop against real agents is in test_verifier_monitor.py, test_backoff.py and
test_durability.py.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import trio
from trio.testing import MockClock

from keytrio.actors.common.client import CommunicationError, HttpError, MalformedResponse
from keytrio.actors.common.store import Store, sqlite_url
from keytrio.actors.verifier import attest, monitor, records
from keytrio.actors.verifier.migrations import MIGRATIONS
from keytrio.actors.verifier.monitor import (
    COMM_ERROR,
    COMM_HTTP_STATUS,
    COMM_MALFORMED,
    INTERNAL_ERROR,
    MonitorSet,
    MonitorSettings,
)
from keytrio.actors.verifier.schema import agents
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.quote import ClockInfo
from tests.actors.verifier.cluster_support import agent_row

AID = "a1"
SLOTS = 4


class Notices:
    """The notifier's two calls; the committed notices' messages (with the failure's context)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def stage(self, conn: sa.Connection, notice: Any, now: float) -> None:
        pass

    def committed(self, notice: Any) -> None:
        self.messages.append(json.loads(notice.msg))


class ScriptedRound:
    """``attest.attest_once`` answering from a script: "ok" (a good quote: the state advances as
    evaluate's would) or an exception to raise. Notes the mock time of every attempt and the free
    request slots during it. Every script ends in a final state (the monitor ends by itself)."""

    def __init__(self, ms_box: list[MonitorSet], script: list[Any]) -> None:
        self.ms_box = ms_box
        self.script = list(script)
        self.times: list[float] = []
        self.free_slots: list[int] = []

    async def __call__(self, client: Any, target: Any, state: Any, *, max_response_bytes: int) -> list[Any]:
        self.times.append(trio.current_time())
        self.free_slots.append(self.ms_box[0].limiter._free)
        await trio.lowlevel.checkpoint()  # a request suspends at least once
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        state.clock = ClockInfo(1000 * len(self.times), 1, 1, 1)
        state.hash_alg, state.enc_alg, state.sign_alg, state.boottime = "sha256", "rsa", "rsassa", 5
        state.ima_ml_entry += 1
        state.attestation_count += 1
        return []


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=0.3)


@pytest.fixture
async def store(tmp_path: Any) -> AsyncIterator[Store]:
    s = await Store.open(sqlite_url(tmp_path / "v.sqlite"), migrations=MIGRATIONS)
    await s.write(lambda c: c.execute(sa.insert(agents), [agent_row(AID)]))
    try:
        yield s
    finally:
        await s.close()


async def run_script(store: Store, monkeypatch: pytest.MonkeyPatch, script: list[Any]
                     ) -> tuple[ScriptedRound, MonitorSet, Notices, dict[str, Any]]:
    """The monitor of AID from its start until it ended (in a final state)."""
    box: list[MonitorSet] = []
    scripted = ScriptedRound(box, script)
    monkeypatch.setattr(attest, "attest_once", scripted)
    monkeypatch.setattr(monitor, "target_from_row", lambda row, ima=None, **kw: SimpleNamespace(ima_check=None))
    notices = Notices()
    async with trio.open_nursery() as nursery:
        ms = MonitorSet(store, nursery=nursery, context_for=lambda row: None,  # type: ignore[arg-type]
                        notifier=notices, max_concurrent_requests=SLOTS,  # type: ignore[arg-type]
                        settings=MonitorSettings(quote_interval=2.0, retry_interval=2.0, max_retries=3,
                                                 exponential_backoff=True))
        box.append(ms)
        ms.start(AID)
        with trio.fail_after(600):  # mock seconds: a hang guard only (each step: 0.3 s real idleness)
            while AID in ms.running:
                await trio.sleep(5)
    assert scripted.script == [], "the monitor ended before its script did"
    assert ms.limiter._free == SLOTS  # every slot given back
    row = await records.get(store, AID)
    assert row is not None
    return scripted, ms, notices, row


def polls(ms: MonitorSet, result: str) -> float:
    return ms.metrics.poll_results[result]._value.get()


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


def comm() -> CommunicationError:
    return CommunicationError("refused", "https://agent/quotes/integrity", "connection refused")


async def test_steady_failures_retry_with_backoff_and_a_good_answer_resets_the_count(
    store: Store, monkeypatch: pytest.MonkeyPatch, clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keytrio.verifier")
    states: list[int] = []
    real_update = records.update_if_state

    def update(store: Store, agent_id: str, only: Any, **values: Any) -> Any:
        states.append(values["operational_state"])
        return real_update(store, agent_id, only, **values)

    monkeypatch.setattr(records, "update_if_state", update)
    # two good polls; a poll whose first attempt is unreachable, retried twice (2, 4 s) until good;
    # a good poll; a poll failing on every attempt: 4 attempts (max_retries 3: 2, 4, 8 s), FAILED
    script = ["ok", "ok", comm(), HttpError(500, "oops"), "ok", "ok",
              HttpError(599, "timeout"), comm(), comm(), comm()]
    scripted, ms, notices, row = await run_script(store, monkeypatch, script)
    # a poll's sleep ends up to the shared timer's slack late (0.05 s: quote_interval / 40), a retry's
    # sleep on time
    assert gaps(scripted.times) == [2.05, 2.05, 2.0, 4.0, 2.05, 2.05, 2.0, 4.0, 8.0], scripted.times
    assert row["operational_state"] == records.FAILED and row["last_event_id"] == COMM_ERROR, row
    assert row["attestation_count"] == 4 and row["next_ima_ml_entry"] == 4, row
    # GET_QUOTE_RETRY at the first failure of each poll, back to GET_QUOTE with the good answer
    # (in the success record, not an update); the second poll's retries write nothing more
    assert states == [records.GET_QUOTE_RETRY, records.GET_QUOTE_RETRY], states
    [msg] = notices.messages
    context = json.loads(msg["context"]) if isinstance(msg["context"], str) else msg["context"]
    assert msg["event_id"] == COMM_ERROR and context["attempts"] == 4 and context["kind"] == "refused", msg
    retries = [m.split("attempt=")[1].split()[0] for m in caplog.messages if f"agent={AID} event=retry" in m]
    assert retries == ["1", "2", "1", "2", "3"], retries
    assert (polls(ms, "ok"), polls(ms, "comm_error"), polls(ms, "error")) == (4, 6, 0)
    # the slot is held during each attempt, and given back after it
    assert scripted.free_slots == [SLOTS - 1] * len(scripted.times)


@pytest.mark.parametrize(
    ("raised", "event_id", "result", "context_has"),
    [
        (HttpError(404, "Not Found"), COMM_HTTP_STATUS, "comm_error", {"status": 404}),
        (MalformedResponse(200, "not an envelope"), COMM_MALFORMED, "malformed", {"status": 200}),
        (ValueError("bad base64"), COMM_MALFORMED, "error", {"message": "bad base64"}),
        (ProtocolError("bad quote"), COMM_MALFORMED, "error", {}),
        (RuntimeError("a bug"), INTERNAL_ERROR, "error", {"message": "monitor error", "error": "RuntimeError"}),
    ],
)
async def test_a_steady_poll_s_first_attempt_fails_as_the_retry_loop_decides(
    store: Store, monkeypatch: pytest.MonkeyPatch, clock: MockClock, caplog: pytest.LogCaptureFixture,
    raised: BaseException, event_id: str, result: str, context_has: dict[str, Any],
) -> None:
    """Not retried: a non-retryable status, a malformed reply, an unusable value (fail closed by
    the retry loop), and anything else (propagates: the MonitorSet's internal failure)."""
    scripted, ms, notices, row = await run_script(store, monkeypatch, ["ok", raised])
    assert gaps(scripted.times) == [2.05], scripted.times  # the timer's slack: 0.05 s
    assert row["operational_state"] == records.FAILED and row["last_event_id"] == event_id, row
    assert row["attestation_count"] == 1, row  # the good poll's record landed before the failure
    [msg] = notices.messages
    context = json.loads(msg["context"]) if isinstance(msg["context"], str) else msg["context"]
    assert msg["event_id"] == event_id and context_has.items() <= context.items(), msg
    internal = [m for m in caplog.messages if f"agent={AID} event={INTERNAL_ERROR}" in m
                and "state=" not in m]
    assert bool(internal) == isinstance(raised, RuntimeError), caplog.messages
    assert (polls(ms, "ok"), polls(ms, result)) == (1, 1)
