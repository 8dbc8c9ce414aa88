"""Attestation failure events and their severities, as upstream Keylime names them.

A failure type is ``component[.sub].event`` (e.g. ``pcr_validation.invalid_pcr_16``); the
severity label orders failures so that `last_event_id` can reflect the worst one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Severity(IntEnum):
    INFO = 0
    NOTICE = 1
    WARNING = 2
    ERROR = 3
    CRITICAL = 4
    ALERT = 5
    EMERGENCY = 6

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Severity:
        return cls[label.upper()]


@dataclass(frozen=True)
class Failure:
    """One failed check: ``event_id`` is the upstream-style type, ``context`` says what and where."""

    event_id: str
    context: dict[str, Any] = field(default_factory=dict)
    severity: Severity = Severity.CRITICAL
    recoverable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": self.event_id, "context": self.context}


def worst(failures: list[Failure] | tuple[Failure, ...]) -> Failure | None:
    """The highest-severity failure (the first of equals), or None."""
    best: Failure | None = None
    for f in failures:
        if best is None or f.severity > best.severity:
            best = f
    return best
