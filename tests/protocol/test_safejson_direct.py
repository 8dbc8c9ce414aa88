"""safejson's direct call of the C scanner (``_decode_direct``) against ``JSONDecoder.decode``, and
``loads`` against the general path it had before (``decode`` always, kept below as ``reference``):
the same value, or the same exception (type and text), on a verifier reply, every byte of it
replaced by 16 hostile characters, every truncation, whitespace and extra data around it, and
texts at the bounds (depth, integer digits, floats, constants, duplicate keys, surrogates),
under several bounds; nestings around the interpreter's recursion limit with a depth bound that
lets them through."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest

from keytrio.protocol import safejson
from keytrio.protocol.safejson import JsonError

QUOTE = "r" + base64.b64encode(bytes(range(40))).decode() + ":" + base64.b64encode(bytes(range(60))).decode()
REPLY = json.dumps({"code": 200, "status": "Success", "results": {
    "quote": QUOTE, "hash_alg": "sha256", "enc_alg": "rsa", "sign_alg": "rsassa", "boottime": 1733300000,
    "ima_measurement_list": "10 aa ima-ng sha256:bb /x\n", "ima_measurement_list_entry": 6,
    "mb_measurement_list": None, "n": [-1, 2.5, True, False, {}]}})
HOSTILE = '"\\ \n{}[],:0-xé\x00\ud800'
AT_THE_BOUNDS = [
    "", " ", "\n", "1", " 1", "1 ", "1\n\t\r ", "1 x", "[]", "{}", " {} ", "{}{}", "[1,]", '{"a":1,}', "nul", "null",
    "NaN", "[Infinity]", "-Infinity", "1e999", "[-1e999]", "0." + "1" * 63, "0." + "1" * 64,
    "9" * 64, "9" * 65, "-" + "9" * 64, "-" + "9" * 65, "-0", "01", "[" + "9" * 4400 + "]",
    '{"a": 1, "a": 2}', '{"a": {"b": 1, "b": 1}}', '[{"x": 1}, {"x": 1}]', '{"\\u0061": 1, "a": 2}',
    '"\\ud800"', '["\\udc80"]', '"\\ud83d\\ude00"', '"unterminated', '"\\x"', '"\\u12"',
    "[" * 64 + "]" * 64, "[" * 65 + "]" * 65, "[" * 64, '{"a":' * 64 + "1" + "}" * 64,
    '{"a":' * 65 + "1" + "}" * 65, "[" * 70 + "]" * 69, '"' + "[" * 100 + '"',
]
BOUNDS: list[dict[str, Any]] = [{}, {"max_depth": 2}, {"max_depth": 100_000}, {"max_int_digits": 3},
                                {"allow_surrogates": True}]


def _reference_decoder(max_int_digits: int) -> json.JSONDecoder:
    """safejson's decoder as it was (its own integer check: the module's may change)."""

    def parse_int(s: str) -> int:
        if len(s) - (s[0] == "-") > max_int_digits:
            raise JsonError(f"integer of more than {max_int_digits} digits")
        return int(s)

    return json.JSONDecoder(parse_int=parse_int, parse_float=safejson._parse_float,
                            parse_constant=safejson._refuse_constant, object_pairs_hook=safejson._unique_keys)


def reference(data: Any, *, max_bytes: int = safejson.MAX_BYTES, max_depth: int = safejson.MAX_DEPTH,
              max_int_digits: int = safejson.MAX_INT_DIGITS, allow_surrogates: bool = False) -> Any:
    """safejson.loads as it was before the direct call: ``decode`` for every text."""
    text = safejson._text(data, max_bytes)
    shallow = len(text) <= safejson._COUNT_MAX and text.count("[") + text.count("{") <= max_depth
    try:
        doc = _reference_decoder(max_int_digits).decode(text)
    except JsonError:
        if not shallow:
            safejson._check_depth(text, max_depth)
        raise
    except RecursionError:
        safejson._check_depth(text, max_depth)
        raise JsonError("nested too deeply") from None
    except ValueError as exc:
        if not shallow:
            safejson._check_depth(text, max_depth)
        raise JsonError(f"not JSON ({exc})") from None
    if not shallow and safejson._deeper_than(doc, max_depth):
        raise JsonError(f"nested more than {max_depth} levels deep")
    if not allow_surrogates and safejson._SURROGATE_ESCAPE.search(text):
        safejson._check_surrogates(doc)
    return doc


def _outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        value = fn(*args, **kw)
    except Exception as exc:  # the exception is the outcome compared
        return ("raised", type(exc).__name__, str(exc))
    return ("value", json.dumps(value), repr(value))  # repr: 1 vs 1.0 vs True


def _texts() -> list[str]:
    out = [REPLY, " " + REPLY, REPLY + " ", REPLY + "\n", "\n" + REPLY + "\r\n", REPLY + "x", REPLY + REPLY,
           REPLY + " {}", *AT_THE_BOUNDS]
    out += [REPLY[:i] for i in range(len(REPLY))]
    out += [REPLY[:i] + c + REPLY[i + 1:] for i in range(len(REPLY)) for c in HOSTILE]
    return out


TEXTS = _texts()


def test_decode_direct_is_decode() -> None:
    for max_int_digits in (64, 3):
        decoder = safejson._decoder(max_int_digits)
        for text in TEXTS:
            if text.count("[") + text.count("{") > safejson.MAX_DEPTH:
                continue  # loads never calls it for those
            assert _outcome(safejson._decode_direct, decoder, text) == _outcome(decoder.decode, text), text
            assert _outcome(decoder.decode, text) == _outcome(_reference_decoder(max_int_digits).decode, text), text


@pytest.mark.parametrize("bounds", BOUNDS, ids=repr)
def test_loads_is_the_general_path(bounds: dict[str, Any]) -> None:
    for text in TEXTS:
        assert _outcome(safejson.loads, text, **bounds) == _outcome(reference, text, **bounds), text
    for data in (REPLY.encode(), REPLY.encode()[:-1], b"\xff" + REPLY.encode(), b" " + REPLY.encode()):
        assert _outcome(safejson.loads, data, **bounds) == _outcome(reference, data, **bounds), data


def test_nesting_around_the_recursion_limit() -> None:
    """With a depth bound that lets them through, nestings up to past the interpreter's limit
    decode, or fail, alike (the direct call has two frames fewer: it must not take these)."""
    limit = sys.getrecursionlimit()
    for n in range(limit - 120, limit + 20):
        for text in ("[" * n + "]" * n, '{"a":' * n + "1" + "}" * n):
            assert _outcome(safejson.loads, text, max_depth=10 * limit) == \
                _outcome(reference, text, max_depth=10 * limit), n


def test_the_reply_takes_the_direct_call() -> None:
    decoder = safejson._decoder(safejson.MAX_INT_DIGITS)
    doc, end = decoder.scan_once(REPLY, 0)
    assert end == len(REPLY) and safejson.loads(REPLY) == doc == json.loads(REPLY)
