"""Typed errors raised by protocol/ code.

Every parser and checker in protocol/ raises only subclasses of :class:`ProtocolError`
on bad input, so callers (actors) can map them to API errors without catching everything.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of every error protocol/ raises on bad input."""


class ValidationError(ProtocolError):
    """A request field (UUID, nonce, mask, base64, PEM, ...) is not of the required form.

    ``field`` names the offending input so an API error can say which one it was.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DecodeError(ProtocolError):
    """Bytes or text could not be decoded into the structure they claim to be."""
