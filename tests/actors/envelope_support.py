"""What every v2 answer of every actor must be: the JSON envelope {code, status, results}."""

from __future__ import annotations

import httpx


def envelope(r: httpx.Response, code: int) -> dict:
    """The envelope of ``r``, after checking its status and that code/status/results are well formed."""
    assert r.status_code == code, r.text
    doc = r.json()
    assert doc["code"] == code
    assert isinstance(doc["status"], str) and doc["status"]
    assert isinstance(doc["results"], dict)
    return doc
