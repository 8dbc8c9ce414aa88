"""The tenant library's local checks of an enrolment (``check_request``): hostile policy texts are
usage errors before anything is sent, never a RecursionError out of ``json.loads``."""

from __future__ import annotations

import pytest

from keytrio.actors.tenant.add import AddRequest, check_request
from keytrio.actors.tenant.errors import UsageError

AGENT = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"


@pytest.mark.parametrize("text,reason", [
    ("[" * 100_000, "nested more than 64 levels deep"),
    ('{"a":' * 5_000, "nested more than 64 levels deep"),
    ('{"10": ["00"], "10": ["11"]}', "duplicate key"),
    ('{"mask": NaN}', "not JSON"),
    ("{", "not JSON"),
])
def test_tpm_policy_text_refused(text: str, reason: str) -> None:
    with pytest.raises(UsageError, match=f"tpm_policy: .*{reason}"):
        check_request(AddRequest(AGENT, tpm_policy=text))


@pytest.mark.parametrize("text", ["[" * 100_000, b"{" * 100_000, '{"meta": 1, "meta": 2}'])
def test_runtime_policy_text_refused(text: str | bytes) -> None:
    with pytest.raises(UsageError, match="runtime_policy: "):
        check_request(AddRequest(AGENT, runtime_policy=text))


def test_good_texts_pass() -> None:
    checked = check_request(AddRequest(AGENT, tpm_policy='{"10": ["AA"], "mask": "0x0"}', runtime_policy='{"digests": {}}'))
    assert checked.tpm_policy == '{"10": ["aa"], "mask": "0x400"}'
