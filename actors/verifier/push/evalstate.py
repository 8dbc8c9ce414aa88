"""Push agents' evaluation state, kept in memory between attestations (as the pull monitor does).

What checking a push attestation derives from the agent's enrolment row (the AK parsed from
``ak_tpm``, ``tpm_policy``, the accepted algorithms, the measured-boot policy, the PCRs to ask
for) is built once per enrolment, and the agent's IMA hook (running PCR 10, line count, learned
keys) lives from one passed attestation to the next instead of being rebuilt from the row.

Validity, checked on every use against the row read in the request's own transaction:

* an :class:`Enrolment` remembers the row fields it was built from; any change (tenant update,
  reactivation, another verifier's write on the same database) rebuilds it;
* a hook is taken out of the map for the check (:meth:`EvalStates.take_hook`) and put back only
  after its pass is committed (:meth:`EvalStates.passed`), with the ``ima_progress`` and
  ``next_ima_ml_entry`` written then; it is reused only while the row still holds exactly those
  (a restart, a failure, a reset or another verifier's progress starts again from the row).

The TPM clock of the agent's last good quote (the row's ``tpm_clock_info`` text) is parsed once:
:meth:`EvalStates.previous_clock` keeps the text and what it parses to, and is used only for that
exact text (:meth:`EvalStates.clock_text` keeps the text a pass writes with the clock it came
from, so the next check finds it without parsing).

Named runtime policies are resolved by the hook at every check, so a policy PUT applies to the
next attestation. Entries go when the agent fails, stops or is deleted; the map is bounded.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from keytrio.actors.verifier.monitor import ImaCheckFactory
from keytrio.protocol import evidence, tpm2
from keytrio.protocol import mb_policy as mbp
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.quote import ClockInfo

IMA_PCR = 10
#: rows fields an Enrolment derives from
_ENROLMENT = ("ak_tpm", "tpm_policy", "accept_tpm_hash_algs", "accept_tpm_signing_algs", "mb_policy",
              "runtime_policy_name", "runtime_policy_checksum")
#: entries kept at most (a bound for agents that vanish without a hook call, e.g. deleted elsewhere)
MAX_ENTRIES = 100_000


def has_runtime_policy(row: dict[str, Any]) -> bool:
    return bool(row.get("runtime_policy_name") or row.get("runtime_policy_checksum"))


def has_mb_policy(row: dict[str, Any]) -> bool:
    text = row.get("mb_policy")
    return bool(text) and text not in ("null",) and not mbp.is_empty(text)


def wanted_pcrs(row: dict[str, Any]) -> list[int]:
    policy = json.loads(row["tpm_policy"])
    pcrs: set[int] = set(evidence.policy_pcrs(policy))
    raw = policy.get("mask")
    if isinstance(raw, str):
        try:
            mask = int(raw, 16) & 0xFFFFFF
        except ValueError:
            mask = 0
        pcrs |= {p for p in range(24) if mask >> p & 1}
    pcrs.discard(16)  # the pull model's NK binding: a push agent has no NK
    if has_runtime_policy(row):
        pcrs.add(IMA_PCR)
    if has_mb_policy(row):
        pcrs |= set(mbp.MEASUREDBOOT_PCRS)
    return sorted(pcrs) or [IMA_PCR]


@dataclass(frozen=True)
class Enrolment:
    """What one enrolment row means for checking (raises ProtocolError/ValueError when unusable)."""

    key: tuple[Any, ...]
    ak: tpm2.AkKey
    tpm_policy: dict[str, Any]
    hash_algs: tuple[str, ...]
    sign_algs: tuple[str, ...]
    pcrs: list[int]
    runtime: bool
    mb: evidence.RefStateCheck | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> Enrolment:
        return cls(
            key=_key(row), ak=tpm2.ak_key(base64.b64decode(row["ak_tpm"])),
            tpm_policy=json.loads(row["tpm_policy"]),
            hash_algs=tuple(json.loads(row["accept_tpm_hash_algs"])),
            sign_algs=tuple(json.loads(row["accept_tpm_signing_algs"])),
            pcrs=wanted_pcrs(row), runtime=has_runtime_policy(row),
            mb=evidence.RefStateCheck.from_text(row["mb_policy"]) if has_mb_policy(row) else None,
        )  # fmt: skip


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(name) for name in _ENROLMENT)


def _hook_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row.get("ima_sign_verification_keys"), row.get("ima_progress"), int(row.get("next_ima_ml_entry") or 0))


class EvalStates:
    """The map agent -> (Enrolment, IMA hook) of one verifier's push agents (see module doc)."""

    def __init__(self, ima_check_for: ImaCheckFactory | None) -> None:
        self.ima_check_for = ima_check_for
        self._enrolments: dict[str, Enrolment] = {}
        #: agent -> (the enrolment key, the row's hook key it is valid for, the hook)
        self._hooks: dict[str, tuple[tuple[Any, ...], tuple[Any, ...], Any]] = {}
        #: agent -> (a ``tpm_clock_info`` text, what it parses to: None when unusable)
        self._clocks: dict[str, tuple[str, ClockInfo | None]] = {}

    def enrolment(self, row: dict[str, Any]) -> Enrolment:
        agent_id = row["agent_id"]
        found = self._enrolments.get(agent_id)
        if found is not None and found.key == _key(row):
            return found
        enr = Enrolment.of(row)
        if len(self._enrolments) >= MAX_ENTRIES:
            self._enrolments.clear()
        self._enrolments[agent_id] = enr
        return enr

    def take_hook(self, row: dict[str, Any], enr: Enrolment) -> Any:
        """The agent's IMA hook for one check, out of the map until :meth:`passed` puts it back."""
        if not enr.runtime or self.ima_check_for is None:
            return None
        kept = self._hooks.pop(row["agent_id"], None)
        if kept is not None and kept[0] == enr.key and kept[1] == _hook_key(row):
            return kept[2]
        return self.ima_check_for(row)

    def passed(self, row: dict[str, Any], enr: Enrolment, hook: Any, values: dict[str, Any]) -> None:
        """The pass with ``values`` (written to the row) is committed: keep ``hook`` for the next one."""
        if hook is None or "ima_progress" not in values:
            return  # a hook whose progress was not written is not what the row says: not kept
        after = {**row, **values}
        if len(self._hooks) >= MAX_ENTRIES:
            self._hooks.clear()
        self._hooks[row["agent_id"]] = (enr.key, _hook_key(after), hook)

    def previous_clock(self, agent_id: str, text: str) -> ClockInfo | None:
        """``ClockInfo.from_json(json.loads(text))`` (None when that fails), parsed once per text:
        the row's clock is the one the agent's last pass wrote, the same text check after check."""
        kept = self._clocks.get(agent_id)
        if kept is not None and kept[0] == text:
            return kept[1]
        try:
            clock: ClockInfo | None = ClockInfo.from_json(json.loads(text))
        except (ValueError, ProtocolError):
            clock = None
        self._keep_clock(agent_id, text, clock)
        return clock

    def clock_text(self, agent_id: str, clock: ClockInfo) -> str:
        """The ``tpm_clock_info`` text a pass writes for ``clock`` (``json.dumps(clock.to_json(),
        sort_keys=True)``, as :meth:`ClockInfo.json_text` spells it), kept with the clock: if it is
        committed, the next check reads this text and :meth:`previous_clock` need not parse it."""
        # json_text is that text, and parsing it gives back an equal clock, for non-negative plain
        # ints (what a quote decodes to); anything else is spelled by json and parsed from the row
        if not all(type(v) is int and v >= 0 for v in (clock.clock, clock.reset_count, clock.restart_count,
                                                       clock.safe)):
            return json.dumps(clock.to_json(), sort_keys=True)
        text = clock.json_text()
        self._keep_clock(agent_id, text, clock)
        return text

    def _keep_clock(self, agent_id: str, text: str, clock: ClockInfo | None) -> None:
        if len(self._clocks) >= MAX_ENTRIES and agent_id not in self._clocks:
            self._clocks.clear()
        self._clocks[agent_id] = (text, clock)

    def forget(self, agent_id: str) -> None:
        self._enrolments.pop(agent_id, None)
        self._hooks.pop(agent_id, None)
        self._clocks.pop(agent_id, None)

    def __len__(self) -> int:
        return len(self._enrolments)
