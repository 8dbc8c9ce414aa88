"""common.app.echoed_text: the bytes it returns for a body's ``data`` member always decode to that
member, whatever the layout; it gives up (None) when ``data`` is not last, the body is not ASCII or
the members before it run past its window."""

from __future__ import annotations

import json
import random
from typing import Any

from keytrio.actors.common.app import echoed_text
from keytrio.protocol import safejson

WS = ["", " ", "\t", "\r\n", " \n "]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(['"data": {', "}", "\\", '"', "a\u00e9", "\udc80", "x" * rng.randrange(50)])
    if kind == 1:
        return rng.choice([0, -1, 10**12, 1.5, True, False, None])
    if kind == 2:
        return "}" * rng.randrange(3)
    if kind == 3:
        return ""
    if kind == 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randrange(3))}


def _encode(rng: random.Random, doc: Any) -> str:
    """JSON text of ``doc`` with random whitespace and escaping."""
    w = lambda: rng.choice(WS)  # noqa: E731
    if isinstance(doc, dict):
        members = [f"{w()}{_encode(rng, k)}{w()}:{w()}{_encode(rng, v)}{w()}" for k, v in doc.items()]
        return "{" + ",".join(members) + (w() if not members else "") + "}"
    if isinstance(doc, list):
        return "[" + ",".join(f"{w()}{_encode(rng, v)}{w()}" for v in doc) + "]"
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.8)
    return text.replace("/", "\\/") if rng.random() < 0.3 else text


def test_echoed_text_decodes_to_the_member_or_gives_up() -> None:
    rng = random.Random(20)
    spliced = 0
    for _ in range(3000):
        members = [(f"m{i}", _value(rng)) for i in range(rng.randrange(3))]
        members.insert(rng.randrange(len(members) + 1), ("data", _value(rng)))
        if rng.random() < 0.05:
            members.insert(0, ("pad", "p" * 5000))
        text = rng.choice(WS) + _encode(rng, dict(members)) + rng.choice(WS)
        raw = text.encode("utf-8", "surrogatepass")
        try:
            doc = safejson.loads(raw, allow_surrogates=True)
        except safejson.JsonError:
            continue  # a lone surrogate written raw: not UTF-8, refused before any echo
        view = echoed_text(raw, doc, "data")
        got = bytes(view) if view is not None else None
        last = list(doc)[-1] == "data"
        if got is None:
            assert not last or not raw.isascii() or raw.index(b'"data"') > 3000, text[:200]
            continue
        spliced += 1
        assert last and raw.isascii()
        assert json.loads(got) == doc["data"] and got in raw
    assert spliced > 1000
