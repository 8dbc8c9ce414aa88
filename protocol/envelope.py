"""The JSON envelope every Keylime REST response uses, errors included."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from keytrio.protocol.errors import DecodeError

Envelope = dict[str, Any]


def envelope(code: int, status: str | None = None, results: dict[str, Any] | None = None) -> Envelope:
    """``{"code": code, "status": status, "results": results}``.

    ``status`` defaults to the HTTP reason phrase ("Success" for 200, as upstream says it).
    """
    if status is None:
        status = "Success" if code == 200 else _reason(code)
    return {"code": int(code), "status": status, "results": results if results is not None else {}}


def success(results: dict[str, Any] | None = None, status: str = "Success") -> Envelope:
    return envelope(200, status, results)


def error(code: int, status: str | None = None, results: dict[str, Any] | None = None) -> Envelope:
    """An error envelope; ``status`` is the human-readable reason (never a secret)."""
    return envelope(code, status, results)


def parse(doc: Any) -> tuple[int, str, dict[str, Any]]:
    """Split a received envelope into (code, status, results); raise DecodeError if it is not one."""
    if not isinstance(doc, dict):
        raise DecodeError("response is not a JSON object")
    code, status, results = doc.get("code"), doc.get("status"), doc.get("results", {})
    if not isinstance(code, int) or isinstance(code, bool):
        raise DecodeError("response envelope has no integer 'code'")
    if not isinstance(status, str):
        raise DecodeError("response envelope has no string 'status'")
    if results is None:
        results = {}
    if not isinstance(results, dict):
        raise DecodeError("response envelope 'results' is not an object")
    return code, status, results


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"
