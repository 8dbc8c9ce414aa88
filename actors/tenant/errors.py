"""Typed tenant errors: a CLI maps each class to an exit code (``exit_code``)."""

from __future__ import annotations

from typing import Any


class TenantError(Exception):
    """Base of every error the tenant library raises on purpose."""

    exit_code = 1


class UsageError(TenantError):
    """The caller asked for something malformed (bad agent id, unreadable file, ...)."""

    exit_code = 2


class ConnectionProblem(TenantError):
    """A peer could not be reached or did not answer in time (no HTTP response, or a garbled one)."""

    exit_code = 3

    def __init__(self, peer: str, detail: str) -> None:
        super().__init__(f"cannot talk to the {peer}: {detail}")
        self.peer = peer
        self.detail = detail


class VerificationFailed(TenantError):
    """What a peer proved does not hold: identity quote, PCR 16, EK certificate, keys/verify HMAC,
    or the verifier never reached the expected state."""

    exit_code = 4

    def __init__(self, what: str, detail: str, **context: Any) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail
        self.context = context


class Refused(TenantError):
    """A peer answered, and said no (an HTTP error status with its envelope status text)."""

    exit_code = 5

    def __init__(self, peer: str, status_code: int, message: str, results: dict[str, Any] | None = None) -> None:
        super().__init__(f"the {peer} refused (HTTP {status_code}): {message}")
        self.peer = peer
        self.status_code = status_code
        self.message = message
        self.results = results or {}
