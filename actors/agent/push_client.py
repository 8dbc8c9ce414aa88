"""HTTPS to the verifier in push mode: server verification only, no client certificate.

The agent authenticates with the PoP bearer token, never with TLS (as upstream's push agent).
Each call returns the status, the JSON document (if the body is one) and ``Retry-After``; it
raises :class:`Unreachable` when no HTTP answer came (refused, timeout, TLS, reset), which the
attestation loop answers with backoff. One pooled client: connections are reused between cycles
and dropped after a transport error so that the next attempt dials afresh.
"""

from __future__ import annotations

import json
import math
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from keytrio.actors.common import client as http
from keytrio.protocol import safejson

JSON_API = "application/vnd.api+json"
MAX_ANSWER_BYTES = 4 << 20


class Unreachable(Exception):
    """No HTTP answer from the verifier."""


@dataclass(frozen=True)
class Answer:
    status: int
    doc: Any  # the decoded JSON body, None when the body is not JSON
    retry_after: float | None
    location: str | None

    def detail(self) -> str:
        """The errors' detail text of a JSON:API error document (for the log)."""
        errors = self.doc.get("errors") if isinstance(self.doc, dict) else None
        if isinstance(errors, list):
            texts = [str(e.get("detail") or e.get("code") or "") for e in errors if isinstance(e, dict)]
            return "; ".join(t for t in texts if t)[:300]
        return ""


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (upstream sends an integer); None when absent or unusable."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP-date: the loop falls back to its own backoff
    return seconds if math.isfinite(seconds) and 0 <= seconds <= 86400 else None


class VerifierClient:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._ssl = ssl_context
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Answer:
        if self._client is None:
            self._client = http.make_client(self._ssl, timeout=self._timeout)
        headers = {"Accept": f"{JSON_API}, application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        content = None
        if body is not None:
            headers["Content-Type"] = JSON_API  # upstream requires it on the attestation routes
            content = json.dumps(body, separators=(",", ":")).encode()
        url = self.base_url + path
        try:
            async with self._client.stream(method, url, headers=headers, content=content) as response:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_ANSWER_BYTES:
                        raise Unreachable(f"{method} {url}: answer larger than {MAX_ANSWER_BYTES} bytes")
        except (httpx.TransportError, httpx.DecodingError) as exc:
            await self.aclose()
            raise Unreachable(f"{method} {url}: {type(exc).__name__}: {exc or 'no answer'}") from exc
        except Unreachable:
            await self.aclose()
            raise
        try:
            doc = safejson.loads(bytes(data), max_bytes=MAX_ANSWER_BYTES) if data else None
        except ValueError:
            doc = None
        return Answer(response.status_code, doc, retry_after(response.headers.get("retry-after")),
                      response.headers.get("location"))
