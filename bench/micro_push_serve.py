"""Per-change microbenchmark of 4c.10 (issue 19 item 7): serve.py's lean path, before and after.

    python -m bench.micro_push_serve [--rounds 5] [--number 20000]

Canned input shaped like bench.sim_push's lean client (a PATCH of ≈ 900 body bytes with Host,
Content-Type, Content-Length and a session's Authorization), this process only, min over rounds of
the mean per call (µs), before and after alternating within each round:

- the lean request head: the previous per-line regex parse (kept here verbatim) against
  serve._lean_request with its line memo;
- the lean response template of a 202 (content type and length, hypercorn's Date and Server): the
  previous per-header regex check against serve._lean_response with its memo;
- the push cycle's layers as serve.py called them (FastRoutes(scope, receive, send): scope dict,
  two closures, two ASGI messages, FastRoutes.match, FastCycle's own match) against
  FastRoutes.direct + FastCycle.answer, with a route that answers at once (so only the layers
  are measured; the real route's work is the same on both);
- for reference (not changed): one request's two moves of the connection deadline
  (CancelScope.deadline's setter, keep-alive <-> request timeout).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

import trio
from hypercorn.config import Config

from keytrio.actors.common import serve
from keytrio.actors.common.app import FastRoutes
from keytrio.actors.verifier.push.fast import FastCycle

_FAST_LINE = re.compile(rb"(POST|PATCH) (/v[0-9][0-9.]*/[A-Za-z0-9/_.~-]+) HTTP/1\.1\r\n")
_LEAN_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*")
_LEAN_REFUSED = frozenset({b"connection", b"transfer-encoding", b"expect", b"upgrade", b"te", b"keep-alive",
                           b"http2-settings", b"trailer"})


def before_request(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """serve._lean_request before 4c.10."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > 8192:
        return None
    lines = data[:end].split(b"\r\n")
    if _FAST_LINE.fullmatch(lines[0] + b"\r\n") is None:
        return None
    body = data[end + 4:]
    headers: list[tuple[bytes, bytes]] = []
    hosts = lengths = 0
    for line in lines[1:]:
        m = _LEAN_HEADER.fullmatch(line)
        if m is None:
            return None
        name, value = m.group(1).lower(), m.group(2)
        if name in _LEAN_REFUSED:
            return None
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths += 1
            if not value.isdigit() or int(value) != len(body):
                return None
        headers.append((name, value))
    if hosts != 1 or lengths != 1:
        return None
    return headers, body


def before_response(status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> bytes | None:
    """serve._lean_response before 4c.10."""
    if not 200 <= status <= 999 or status in (204, 304):
        return None
    parts = [b"HTTP/1.1 %d \r\n" % status]
    lengths = 0
    for name, value in headers:
        line = name + b": " + value
        m = _LEAN_HEADER.fullmatch(line)
        if m is None or m.group(2) != value:
            return None
        low = name.lower()
        if low in _LEAN_REFUSED:
            return None
        if low == b"content-length":
            lengths += 1
            if not value.isdigit() or int(value) != len(payload):
                return None
        parts.append(line + b"\r\n")
    if lengths != 1:
        return None
    parts.append(b"\r\n")
    parts.append(payload)
    return b"".join(parts)


AGENT = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
PATH = f"/v3/agents/{AGENT}/attestations/latest"
BODY = b'{"data": {"type": "attestation", "attributes": {"evidence_collected": []}}}'.ljust(900)
REQUEST = (f"PATCH {PATH} HTTP/1.1\r\nHost: 127.0.0.1:8881\r\nContent-Type: application/vnd.api+json\r\n"
           f"Content-Length: {len(BODY)}\r\nAuthorization: Bearer {'a' * 43}\r\n\r\n").encode() + BODY


class _Cycle:
    async def capabilities(self, prefix: str, agent_id: str, authorization: str | None, doc: object) -> Any:
        return 201, {"data": {"id": "3"}}, {"Location": f"/v3/agents/{agent_id}/attestations/3"}

    async def evidence(self, prefix: str, agent_id: str, which: str, authorization: str | None, doc: object) -> Any:
        return 202, {"data": {"id": "3"}}, {"Location": f"/v3/agents/{agent_id}/attestations/3"}


def _layers() -> FastRoutes:
    async def quart(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    routes = FastRoutes(quart)
    fast = FastCycle(routes.app, _Cycle())
    routes.app = fast
    routes.lean.append(fast)
    return routes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--number", type=int, default=20000)
    args = ap.parse_args()
    config = Config()
    parsed = serve._lean_request(REQUEST)
    assert parsed is not None and parsed == before_request(REQUEST)
    headers_in, body = parsed
    payload = b"y" * 600
    answer_headers = [(b"content-type", b"application/json"), (b"content-length", b"600"),
                      (b"location", f"/v3/agents/{AGENT}/attestations/3".encode())]
    routes = _layers()

    async def via_asgi() -> Any:
        answer: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            answer[message["type"]] = message

        await routes({"type": "http", "method": "PATCH", "path": PATH, "headers": headers_in}, receive, send)
        start = answer["http.response.start"]
        return start["status"], [*start["headers"], *serve.response_headers(config)], \
            answer["http.response.body"]["body"]

    async def via_direct() -> Any:
        status, headers, out = await routes.direct("PATCH", PATH).answer(  # type: ignore[union-attr]
            "PATCH", PATH, headers_in, body)
        return status, [*headers, *serve.response_headers(config)], out

    async def run_async(make: Callable[[], Any], number: int) -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            await make()
        return (time.perf_counter() - t0) / number * 1e6

    def per_call(fn: Callable[[], object], number: int) -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number * 1e6

    async def deadline_moves(number: int) -> float:
        with trio.CancelScope() as scope:
            t0 = time.perf_counter()
            for _ in range(number):
                scope.deadline = trio.current_time() + 60.0
                scope.deadline = trio.current_time() + 5.0
            return (time.perf_counter() - t0) / number * 1e6

    sync_cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("lean request head (per request)", lambda: before_request(REQUEST), lambda: serve._lean_request(REQUEST)),
        ("lean response template (per answer)",
         lambda: before_response(202, [*answer_headers, *serve.response_headers(config)], payload),
         lambda: serve._lean_response(202, [*answer_headers, *serve.response_headers(config)], payload)),
    ]

    async def measure() -> None:
        best: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, old, new in sync_cases:
                row = best.setdefault(name, [float("inf"), float("inf")])
                row[0] = min(row[0], per_call(old, args.number))
                row[1] = min(row[1], per_call(new, args.number))
            row = best.setdefault("push cycle layers (per request, route answers at once)", [float("inf")] * 2)
            row[0] = min(row[0], await run_async(via_asgi, args.number))
            row[1] = min(row[1], await run_async(via_direct, args.number))
            row = best.setdefault("deadline moves of one request (unchanged, for reference)", [float("inf")] * 2)
            row[0] = row[1] = min(row[0], await deadline_moves(args.number))
        assert await via_asgi() == await via_direct()
        print("| change | before | after | saved |")
        print("|---|---|---|---|")
        for name, (old, new) in best.items():
            print(f"| {name} | {old:.2f} µs | {new:.2f} µs | {old - new:.2f} µs |")

    trio.run(measure)


if __name__ == "__main__":
    main()
