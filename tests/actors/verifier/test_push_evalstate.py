"""The push agents' kept evaluation state (actors/verifier/push/evalstate.py) follows the row: a
changed enrolment is rebuilt, and an IMA hook is reused only while the row holds exactly the
progress its committed pass wrote (real ImaHooks over a real parsed runtime policy)."""

from __future__ import annotations

import base64
import json
from typing import Any

from keytrio.actors.verifier.ima import FixedPolicy, ImaHooks
from keytrio.actors.verifier.push.evalstate import EvalStates
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.quote import ClockInfo
from keytrio.protocol.runtime_policy import parse_policy
from tests.actors.verifier.push_support import PATHS, policy_for
from tests.protocol.tpm2_support import ak_public


def _row(**over: Any) -> dict[str, Any]:
    row = {
        "agent_id": "a0000000-0000-4000-8000-00000000000a",
        "ak_tpm": base64.b64encode(ak_public("rsa").marshal()).decode(),
        "tpm_policy": json.dumps({"mask": "0x0"}), "accept_tpm_hash_algs": '["sha256"]',
        "accept_tpm_signing_algs": '["rsassa"]', "mb_policy": None,
        "runtime_policy_name": "p", "runtime_policy_checksum": None, "ima_sign_verification_keys": "",
        "ima_progress": None, "next_ima_ml_entry": 0,
    }  # fmt: skip
    row.update(over)
    return row


def _states() -> EvalStates:
    return EvalStates(ImaHooks(FixedPolicy(parse_policy(json.dumps(policy_for(PATHS))))))


def test_enrolment_is_kept_until_the_row_changes() -> None:
    states = _states()
    row = _row()
    enr = states.enrolment(row)
    assert enr.pcrs == [10] and enr.runtime and enr.mb is None
    assert states.enrolment(dict(row)) is enr  # same fields: the parsed state is reused
    changed = states.enrolment(_row(tpm_policy=json.dumps({"mask": "0x1"})))
    assert changed is not enr and changed.pcrs == [0, 10]
    other_ak = states.enrolment(_row(ak_tpm=base64.b64encode(ak_public("rsa2").marshal()).decode()))
    assert other_ak.ak.key.public_numbers() != enr.ak.key.public_numbers()
    states.forget(row["agent_id"])
    assert len(states) == 0


def test_hook_is_reused_only_for_the_progress_its_pass_wrote() -> None:
    states = _states()
    row = _row()
    enr = states.enrolment(row)
    hook = states.take_hook(row, enr)
    assert hook is not None
    written = {"ima_progress": hook.progress_json(), "next_ima_ml_entry": 0}
    # taken out for the check: a second check before the pass is committed gets a fresh hook
    assert states.take_hook(row, enr) is not hook
    states.passed(row, enr, hook, written)
    after = {**row, **written}
    assert states.take_hook(after, enr) is hook  # the row holds what the pass wrote
    states.passed(row, enr, hook, written)
    # the row moved on without this process (a restart, another verifier, a reset): rebuilt
    assert states.take_hook({**after, "next_ima_ml_entry": 3}, enr) is not hook
    # a pass that wrote no progress does not keep its hook
    states.passed(row, enr, hook, {"hash_alg": "sha256"})
    assert states.take_hook(after, enr) is not hook
    # no runtime policy: no hook at all
    plain = _row(runtime_policy_name=None)
    assert states.take_hook(plain, states.enrolment(plain)) is None


def _general_clock(text: str) -> ClockInfo | None:
    """What push verify's check_with parsed the row's clock to before the memo."""
    try:
        return ClockInfo.from_json(json.loads(text))
    except (ValueError, ProtocolError):
        return None


_CLOCK_TEXTS = [
    '{"clock": 5, "resetcount": 1, "restartcount": 0, "safe": 1}',
    '{"safe": 1, "restartcount": 0, "resetcount": 1, "clock": 5}',
    '{"clock": 5, "resetcount": 1, "restartcount": 0, "safe": true}',  # bool: refused
    '{"clock": -5, "resetcount": 1, "restartcount": 0, "safe": 1}',
    '{"clock": 5.0, "resetcount": 1, "restartcount": 0, "safe": 1}',
    '{"clock": 5, "resetcount": 1, "restartcount": 0}',
    '{"clock": 18446744073709551615, "resetcount": 4294967295, "restartcount": 4294967295, "safe": 1}',
    "null", "[]", "[1, 2, 3, 4]", "{}", "not json", '{"clock": 5', '"text"', "7",
]


def test_previous_clock_is_the_general_parse_of_exactly_the_row_text() -> None:
    states = _states()
    agent = "a0000000-0000-4000-8000-00000000000a"
    # each text alone, then again from the memo, and interleaved (every change of text re-parsed)
    for text in _CLOCK_TEXTS * 2:
        want = _general_clock(text)
        assert states.previous_clock(agent, text) == want
        assert states.previous_clock(agent, text) == want
        assert type(states.previous_clock(agent, text)) is type(want)
    for a, b in zip(_CLOCK_TEXTS, reversed(_CLOCK_TEXTS), strict=True):
        assert states.previous_clock(agent, a) == _general_clock(a)
        assert states.previous_clock("other", b) == _general_clock(b)


def test_clock_text_is_the_sorted_json_and_what_the_next_check_parses() -> None:
    states = _states()
    agent = "a0000000-0000-4000-8000-00000000000a"
    clocks = [ClockInfo(0, 0, 0, 0), ClockInfo(123456789, 3, 0, 1), ClockInfo(2**64 - 1, 2**32 - 1, 2**32 - 1, 1)]
    clocks += [ClockInfo(1000 * i + 7, i % 5, i % 3, i % 2) for i in range(200)]
    for clock in clocks:
        text = states.clock_text(agent, clock)
        assert text == json.dumps(clock.to_json(), sort_keys=True)
        # the next check reads the text back from the row: the kept clock is its general parse
        got = states.previous_clock(agent, text)
        assert got == _general_clock(text) and got == clock
        assert got is clock  # kept by clock_text: not parsed again
        assert [type(v) for v in vars(got).values()] == [int] * 4
    # a clock that does not parse back to itself (a bool field) is not kept for its text
    odd = ClockInfo(5, 1, 0, True)  # type: ignore[arg-type]
    text = states.clock_text(agent, odd)
    assert text == json.dumps(odd.to_json(), sort_keys=True)
    assert states.previous_clock(agent, text) == _general_clock(text) is None  # json's "true": refused


def test_clock_memo_is_bounded_and_forgotten(monkeypatch: Any) -> None:
    from keytrio.actors.verifier.push import evalstate

    monkeypatch.setattr(evalstate, "MAX_ENTRIES", 8)
    states = _states()
    text = '{"clock": 5, "resetcount": 1, "restartcount": 0, "safe": 1}'
    for i in range(50):
        assert states.previous_clock(f"agent-{i}", text) == _general_clock(text)
        assert len(states._clocks) <= 8
    states.forget("agent-49")
    assert "agent-49" not in states._clocks
