"""The worker side of the driver <-> worker protocol (stdlib only: both interpreters import it).

The driver writes one JSON command per line on the worker's stdin; the worker answers one JSON
line per command on the *original* stdout. Anything else the worker's libraries print (upstream
logs to stdout) is redirected to stderr first, so it can never corrupt the answers.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def timed(fn: Callable[[], bool]) -> tuple[float, float, bool]:
    """(CPU seconds of this thread, wall seconds, verdict) of one call. CPU time is the headline:
    it does not count time the pinned worker waited for its CPU on a busy machine."""
    c0, t0 = time.thread_time(), time.perf_counter()
    ok = fn()
    return time.thread_time() - c0, time.perf_counter() - t0, bool(ok)


def list_text(lines: list[str], n: int, tamper: dict[str, Any] | None = None) -> str:
    """The first ``n`` IMA lines as one text; ``tamper`` = {"line": i, "text": ...} replaces one."""
    head = lines[:n]
    if tamper is not None:
        head[tamper["line"]] = tamper["text"] + "\n"
    return "".join(head)


def evidence_case(inp: dict[str, Any], lines: list[str], cmd: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """(case, IMA list text, nonce) of an ``evidence`` command: the same on both sides."""
    if cmd.get("tamper"):
        t = inp["tampered"]
        case = {"lines": t["lines"], "nonce": t["nonce"], "quote": t["quote"]}
        text = list_text(lines, t["lines"], t)
    else:
        case = inp["cases"][cmd["case"]]
        text = list_text(lines, case["lines"])
    return case, text, cmd.get("nonce", case["nonce"])  # a wrong nonce is the quote-level control


class Samples:
    """Accumulates ``timed`` results into the reply shape: samples (CPU), wall, valid."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.valid: list[bool] = []

    def add(self, fn: Callable[[], bool]) -> None:
        cpu, wall, ok = timed(fn)
        self.cpu.append(cpu)
        self.wall.append(wall)
        self.valid.append(ok)

    def reply(self, **extra: Any) -> dict[str, Any]:
        return {"samples": self.cpu, "wall": self.wall, "valid": self.valid, **extra}


def serve(handlers: dict[str, Handler]) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints -> stderr
    sys.stdout = sys.stderr
    out.write(json.dumps({"ready": True, "python": sys.version.split()[0], "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "quit":
            break
        try:
            reply = handlers[op](cmd)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        out.write(json.dumps(reply) + "\n")
