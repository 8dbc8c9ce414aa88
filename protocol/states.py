"""Operational states of an agent at the verifier (upstream keylime/common/states.py), by number and name."""

from __future__ import annotations

REGISTERED = 0
START = 1
SAVED = 2
GET_QUOTE = 3
GET_QUOTE_RETRY = 4
PROVIDE_V = 5
PROVIDE_V_RETRY = 6
FAILED = 7
TERMINATED = 8
INVALID_QUOTE = 9
TENANT_FAILED = 10

NAMES: dict[int, str] = {
    REGISTERED: "Registered",
    START: "Start",
    SAVED: "Saved",
    GET_QUOTE: "Get Quote",
    GET_QUOTE_RETRY: "Get Quote (retry)",
    PROVIDE_V: "Provide V",
    PROVIDE_V_RETRY: "Provide V (retry)",
    FAILED: "Failed",
    TERMINATED: "Terminated",
    INVALID_QUOTE: "Invalid Quote",
    TENANT_FAILED: "Tenant Quote Failed",
}

#: States an agent does not leave on its own (a wait for GET_QUOTE can stop early).
FINAL = frozenset({FAILED, TERMINATED, INVALID_QUOTE, TENANT_FAILED})


def name(state: object) -> str:
    if isinstance(state, int) and not isinstance(state, bool):
        return NAMES.get(state, f"Unknown ({state})")
    return f"Unknown ({state!r})"
