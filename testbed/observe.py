"""What the system did, per machine, over time: the material for scenario verdicts and reports.

An :class:`Observer` is fed by the testbed: every verifier ``GET`` a wait makes
(:meth:`Observer.saw_record`), every revocation notice a machine's action recorded
(:meth:`Observer.saw_notice`) and the scenario's step markers (:meth:`Observer.mark`). It keeps

* per machine the sequence of distinct operational states seen (consecutive repeats folded);
* per machine the *events*: the verifier's ``last_event_id`` each time the machine is seen
  entering a failure state (Failed / Invalid Quote), so two failures with the same id count twice
  and a stale ``last_event_id`` after a reactivate is not counted again;
* per machine the notices received: (failing machine, event id);
* one timeline of everything, with seconds since the observer started.

Only what the system reported is recorded, never what a scenario intended: verdicts compare these
records with the scenario's expectation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

FAILED, INVALID_QUOTE = 7, 9
FAILURE_STATES = frozenset({FAILED, INVALID_QUOTE})
GONE = -1  # pseudo-state: the verifier does not know the machine (404)

STATE_NAMES = {
    GONE: "Absent", 0: "Registered", 1: "Start", 2: "Saved", 3: "Get Quote", 4: "Get Quote (retry)",
    5: "Provide V", 6: "Provide V (retry)", 7: "Failed", 8: "Terminated", 9: "Invalid Quote",
    10: "Tenant Quote Failed",
}


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, f"Unknown ({state})")


@dataclass(frozen=True)
class Observation:
    t: float  # seconds since the observer started
    machine: str  # "" for scenario-wide marks
    kind: str  # "state" | "event" | "notice" | "mark" | "count"
    value: Any
    detail: str = ""


@dataclass
class MachineLog:
    states: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    notices: list[tuple[str, str]] = field(default_factory=list)  # (failing machine, event id)
    attestation_count: int = 0


class Observer:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self.timeline: list[Observation] = []
        self.machines: dict[str, MachineLog] = {}

    def _now(self) -> float:
        return round(self._clock() - self._t0, 3)

    def _log(self, machine: str) -> MachineLog:
        return self.machines.setdefault(machine, MachineLog())

    def mark(self, text: str) -> None:
        """A scenario step (shown on the report's timeline)."""
        self.timeline.append(Observation(self._now(), "", "mark", text))

    def saw_record(self, machine: str, record: dict[str, Any] | None) -> None:
        """One verifier GET result for ``machine`` (None: 404)."""
        log = self._log(machine)
        state = GONE if record is None else record.get("operational_state")
        if not isinstance(state, int):
            return
        previous = log.states[-1] if log.states else None
        if state != previous:
            log.states.append(state)
            self.timeline.append(Observation(self._now(), machine, "state", state, state_name(state)))
            if state in FAILURE_STATES and record is not None:
                event = str(record.get("last_event_id") or "")
                log.events.append(event)
                self.timeline.append(Observation(self._now(), machine, "event", event, state_name(state)))
        if record is not None and isinstance(record.get("attestation_count"), int):
            log.attestation_count = record["attestation_count"]

    def saw_notice(self, machine: str, failing: str, event_id: str) -> None:
        """``machine`` ran its revocation actions for a notice about ``failing``."""
        self._log(machine).notices.append((failing, event_id))
        self.timeline.append(Observation(self._now(), machine, "notice", event_id, f"about {failing}"))

    # -- views ------------------------------------------------------------------------------------

    def states(self, machine: str) -> list[int]:
        return list(self._log(machine).states)

    def events(self, machine: str) -> list[str]:
        return list(self._log(machine).events)

    def notices(self, machine: str) -> list[tuple[str, str]]:
        return list(self._log(machine).notices)

    def event_sequences(self) -> dict[str, list[str]]:
        """Per machine: its event ids, then ``notice:<failing>:<event>`` for each notice (sorted,
        as notices to different machines arrive in any order). Same seed, same sequences."""
        return {
            name: log.events + [f"notice:{f}:{e}" for f, e in sorted(log.notices)]
            for name, log in sorted(self.machines.items())
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "machines": {
                name: {
                    "states": log.states,
                    "state_names": [state_name(s) for s in log.states],
                    "events": log.events,
                    "notices": [list(n) for n in log.notices],
                    "attestation_count": log.attestation_count,
                }
                for name, log in sorted(self.machines.items())
            },
            "timeline": [asdict(o) for o in self.timeline],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)
