"""The tenant library: enrol agents with a verifier, and manage them (no CLI yet)."""

from keytrio.actors.tenant.add import AddRequest, AddResult
from keytrio.actors.tenant.errors import (
    ConnectionProblem,
    Refused,
    TenantError,
    UsageError,
    VerificationFailed,
)
from keytrio.actors.tenant.payload import make_payload
from keytrio.actors.tenant.tenant import Tenant

__all__ = [
    "AddRequest",
    "AddResult",
    "ConnectionProblem",
    "Refused",
    "Tenant",
    "TenantError",
    "UsageError",
    "VerificationFailed",
    "make_payload",
]
