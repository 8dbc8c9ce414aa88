"""API versions: which ones each actor speaks, URL prefixes and `/version` payloads."""

from __future__ import annotations

import re

from keytrio.protocol.errors import ValidationError

#: Versions the verifier and registrar serve (PROTOCOL.md); the newest is "current".
SERVER_VERSIONS: tuple[str, ...] = ("2.0", "2.1", "2.2", "2.3", "2.4", "2.5")
#: The agent implements v2.1 (the seed) and claims nothing newer until it implements it.
AGENT_VERSIONS: tuple[str, ...] = ("2.1",)

#: Status text that makes upstream's verifier renegotiate through `/version`.
UNSUPPORTED_VERSION_STATUS = "API version not supported"

_PREFIX = re.compile(r"^v(\d+)\.(\d+)$")


def parse_version_prefix(segment: str) -> str:
    """``"v2.1"`` -> ``"2.1"``; anything else raises ValidationError."""
    m = _PREFIX.fullmatch(segment)
    if not m:
        raise ValidationError("api_version", "expected v<major>.<minor>")
    return f"{int(m.group(1))}.{int(m.group(2))}"


def as_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    if not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in (major, minor)):
        raise ValidationError("api_version", "expected <major>.<minor>")
    return int(major), int(minor)


def server_version_payload(versions: tuple[str, ...] = SERVER_VERSIONS) -> dict[str, object]:
    """The registrar's and verifier's `GET /version` results."""
    return {"current_version": newest(versions), "supported_versions": list(versions)}


def agent_version_payload(versions: tuple[str, ...] = AGENT_VERSIONS) -> dict[str, object]:
    """The agent's `GET /version` results."""
    return {"supported_version": newest(versions), "supported_versions": list(versions)}


def newest(versions: tuple[str, ...] | list[str]) -> str:
    if not versions:
        raise ValidationError("supported_versions", "empty")
    return max(versions, key=as_tuple)


def negotiate(ours: tuple[str, ...] | list[str], theirs: tuple[str, ...] | list[str]) -> str | None:
    """Highest version both sides speak, or None."""
    common = set(ours) & set(theirs)
    return newest(sorted(common)) if common else None
