"""protocol.safejson: the one guarded JSON decoder and the bounded digit parser."""

from __future__ import annotations

import json

import pytest

from keytrio.protocol import safejson
from keytrio.protocol.errors import DecodeError, ValidationError


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 1000 + "]" * 1000, "nested more than 64"),
        ("[" * 200_000, "nested more than 64"),
        ('{"a":' * 65 + "1" + "}" * 65, "nested more than 64"),
        ("1" * 5000, "more than 64 digits"),
        ("-" + "9" * 65, "more than 64 digits"),
        ("[1e999]", "out of range"),
        ("0." + "1" * 100, "more than 64 characters"),
        ("NaN", "NaN is not JSON"),
        ("[-Infinity]", "-Infinity is not JSON"),
        ('{"a": 1, "b": {"c": 2, "c": 3}}', "duplicate key 'c'"),
        ('"\\ud800"', "unpaired UTF-16 surrogate"),
        ('{"\\udc80": 1}', "unpaired UTF-16 surrogate"),
        (b"\xff", "not UTF-8"),
        (b'"\xed\xa0\x80"', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not JSON"),
        ('{"a": 1} x', "not JSON"),
        ("", "not JSON"),
    ],
)
def test_refused_with_one_typed_error(text: str | bytes, reason: str) -> None:
    with pytest.raises(safejson.JsonError, match=reason) as info:
        safejson.loads(text)
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)


def test_accepted_values_are_json_loads_values() -> None:
    doc = {"a": [1, -2, 3.5, "x", None, True], "b": {"c": "\u00e9\U0001f600"}, "n": int("9" * 64)}
    text = json.dumps(doc)
    assert safejson.loads(text) == safejson.loads(text.encode()) == doc
    assert safejson.loads("[" * 64 + "]" * 64) is not None
    # brackets inside strings are text, not nesting
    assert safejson.loads(json.dumps({"s": "[" * 10_000})) == {"s": "[" * 10_000}
    assert safejson.loads('"\\ud83d\\ude00"') == "\U0001f600"  # a pair is fine
    assert safejson.loads('["\\udc80"]', allow_surrogates=True) == ["\udc80"]  # IMA file names


def test_size_bound() -> None:
    with pytest.raises(safejson.JsonError, match="larger than 10 bytes"):
        safejson.loads(b"[" + b"1," * 10 + b"1]", max_bytes=10)
    with pytest.raises(safejson.JsonError, match="larger than 10 bytes"):
        safejson.loads('"' + "\u00e9" * 6 + '"', max_bytes=10)  # 14 bytes of UTF-8
    with pytest.raises(safejson.JsonError, match="must be a JSON object"):
        safejson.loads_object("[]")


@pytest.mark.parametrize("value", ["²", "١٢٣", "\U0001d7d7", "1" * 21, "", "-1", "+1", " 1", "1.0", "0x1", True, 1.0,
                                   None, -1, 70000])
def test_digits_refuses(value: object) -> None:
    with pytest.raises(ValidationError, match="port"):
        safejson.digits(value, "port", lo=0, hi=65535)


def test_digits_accepts() -> None:
    assert safejson.digits("08080", "port", hi=65535) == 8080
    assert safejson.digits(23, "pcr", hi=23) == 23
    assert safejson.digits("9" * 20, "n") == int("9" * 20)


def test_depth_verdict_equals_the_plain_token_scan() -> None:
    """loads (decode first, then measure the containers; scan the text when decoding fails) says
    "nested too deep" exactly when a plain left-to-right scan of string literals and brackets
    does, on hostile bracket/quote soup and on well-formed nestings around the bound."""
    import random
    import re

    tokens = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]', re.S)

    def reference(text: str, max_depth: int) -> bool:
        depth = 0
        for m in tokens.finditer(text):
            if len(m.group()) != 1:
                continue
            if m.group() in "[{":
                depth += 1
                if depth > max_depth:
                    return False
            elif depth:
                depth -= 1
        return True

    def checked(text: str, max_depth: int) -> bool:
        try:
            safejson.loads(text, max_depth=max_depth)
        except safejson.JsonError as exc:
            return not exc.reason.startswith("nested")
        return True

    rnd = random.Random(20)

    def nested(d: int) -> str:
        if d == 0:
            return rnd.choice(['"x[{"', "1", '"\\"]"'])
        inner = [nested(d - 1) for _ in range(rnd.randint(1, 3))]
        if rnd.random() < 0.5:
            return "[" + ",".join(inner) + "]"
        return "{" + ",".join(f'"k{i}":{v}' for i, v in enumerate(inner)) + "}"

    for _ in range(30_000):
        text = "".join(rnd.choice('[]{}"\\a,') for _ in range(rnd.randint(0, 30)))
        depth = rnd.randint(0, 6)
        assert checked(text, depth) == reference(text, depth), (text, depth)
    for _ in range(1_000):
        text, depth = nested(rnd.randint(0, 8)), rnd.randint(0, 9)
        assert checked(text, depth) == reference(text, depth), (text, depth)
    # large texts (past the size up to which loads counts brackets first): the same verdicts
    pad = '"' + "p" * (70 << 10) + '"'
    for _ in range(200):
        d = rnd.randint(0, 8)
        text, depth = "[" + pad + "," + nested(d) + "]", rnd.randint(0, 9)
        assert checked(text, depth) == reference(text, depth), (text[-200:], depth)
        broken = text[:-1] + rnd.choice(["", "]]", ",", "}"])
        assert checked(broken, depth) == reference(broken, depth), (broken[-200:], depth)
