"""The push agents' kept evaluation state (actors/verifier/push/evalstate.py) follows the row: a
changed enrolment is rebuilt, and an IMA hook is reused only while the row holds exactly the
progress its committed pass wrote (real ImaHooks over a real parsed runtime policy)."""

from __future__ import annotations

import base64
import json
from typing import Any

from keytrio.actors.verifier.ima import FixedPolicy, ImaHooks
from keytrio.actors.verifier.push.evalstate import EvalStates
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
