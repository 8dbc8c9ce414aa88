"""The one guarded JSON decoder for everything that arrives from outside.

``loads`` is :func:`json.loads` with bounds, so that no input can make a parser raise anything but
:class:`JsonError` (a :class:`~keytrio.protocol.errors.DecodeError`, hence a ``ValueError``):

* size: at most ``max_bytes`` bytes (UTF-8) of text;
* nesting: at most ``max_depth`` open arrays/objects. Text with fewer brackets than that is
  decoded at once; other text is decoded first (the C decoder guards its recursion with
  RecursionError) and the decoded containers measured, which for big documents of long strings
  costs a fraction of scanning the text; when decoding fails, the iterative scan of the text runs
  first, so that too deep a text is always reported as such (``"[" * 100_000`` included);
* numbers: integers of at most ``max_int_digits`` digits (Python refuses more than 4,300 only with
  a ValueError from deep inside, and converting long ones is quadratic), float literals of at most
  ``MAX_FLOAT_CHARS`` characters and finite; ``NaN``/``Infinity`` refused;
* objects: a key given twice is refused (which value would win is parser-dependent);
* text: bytes must be UTF-8 (no BOM, no UTF-16/32 guessing); a ``\\ud800`` escape that leaves a
  lone surrogate is refused, as it cannot be stored or re-encoded, unless ``allow_surrogates``:
  IMA lists and runtime policies carry file names that are not UTF-8 as surrogate escapes
  (protocol.ima encodes them with ``surrogateescape``), and their parsers handle them.

:func:`digits` is the one bounded parser of decimal numbers written as text (ports, PCR numbers,
list positions ...): ASCII digits only, so ``"²"`` or other Unicode digits are refused, never half-accepted.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from keytrio.protocol.errors import DecodeError, ValidationError

#: Default bounds. The size bound is a backstop: HTTP bodies are bounded per route before this.
MAX_BYTES = 64 << 20
MAX_DEPTH = 64
MAX_INT_DIGITS = 64
MAX_FLOAT_CHARS = 64
#: Longest digit string :func:`digits` converts (a 64-bit count has 20 digits).
MAX_DIGITS = 20


class JsonError(DecodeError):
    """The text is not JSON, or not JSON within the bounds; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# A string literal (escapes included), or a bracket. Possessive quantifiers: one pass, no
# backtracking, whatever the input (an unterminated string simply does not match).
_TOKENS = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]', re.S)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPEN = frozenset("[{")
_COUNT_MAX = 64 << 10


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_int_digits: int = MAX_INT_DIGITS,
    allow_surrogates: bool = False,
) -> Any:
    """The JSON value of ``data``; :class:`JsonError` when it is not JSON within the bounds."""
    text = _text(data, max_bytes)
    # cannot nest deeper than it has brackets; counting them is worth it for small texts only
    # (a large one has more brackets than the bound anyway, and the decoded containers are
    # measured instead: the same verdict, without two passes over a megabyte)
    brackets = text.count("[") + text.count("{") if len(text) <= _COUNT_MAX else None
    shallow = brackets is not None and brackets <= max_depth

    try:
        if brackets is not None and brackets <= MAX_DEPTH:
            doc = _decode_direct(_decoder(max_int_digits), text)
        else:
            doc = _decoder(max_int_digits).decode(text)
    except JsonError:
        if not shallow:
            _check_depth(text, max_depth)
        raise
    except RecursionError:
        _check_depth(text, max_depth)
        raise JsonError("nested too deeply") from None  # unreachable: the scan raises first
    except ValueError as exc:  # JSONDecodeError: position and reason, no content
        if not shallow:
            _check_depth(text, max_depth)
        raise JsonError(f"not JSON ({exc})") from None
    if not shallow and _deeper_than(doc, max_depth):
        raise JsonError(f"nested more than {max_depth} levels deep")
    if not allow_surrogates and _SURROGATE_ESCAPE.search(text):
        _check_surrogates(doc)
    return doc


def loads_object(data: bytes | bytearray | memoryview | str, **bounds: Any) -> dict[str, Any]:
    """:func:`loads` for a document that must be a JSON object."""
    doc = loads(data, **bounds)
    if not isinstance(doc, dict):
        raise JsonError("must be a JSON object")
    return doc


def digits(value: object, field: str, *, lo: int = 0, hi: int | None = None, max_len: int = MAX_DIGITS) -> int:
    """A non-negative decimal number written as ASCII digits (or given as an int), in ``lo..hi``.

    Every numeric input that may arrive as text goes through here: ``str.isdigit`` and ``int``
    accept Unicode digits and raise past 4,300 digits; this accepts ``[0-9]{1,max_len}`` only.
    """
    if isinstance(value, bool):
        raise ValidationError(field, "must be an integer")
    if isinstance(value, str):
        if not 0 < len(value) <= max_len or not value.isascii() or not value.isdigit():
            raise ValidationError(field, f"must be 1-{max_len} ASCII digits")
        value = int(value)
    if not isinstance(value, int):
        raise ValidationError(field, "must be an integer")
    if value < lo or (hi is not None and value > hi):
        raise ValidationError(field, f"must be in {lo}..{hi if hi is not None else ''}")
    return value


def _text(data: bytes | bytearray | memoryview | str, max_bytes: int) -> str:
    if isinstance(data, str):
        # str length counts code points; UTF-8 is at most 4 bytes a code point
        if len(data) > max_bytes or (len(data) * 4 > max_bytes and len(data.encode("utf-8", "surrogatepass")) > max_bytes):
            raise JsonError(f"larger than {max_bytes} bytes")
        return data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise JsonError("not text")
    if len(data) > max_bytes:
        raise JsonError(f"larger than {max_bytes} bytes")
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(f"not UTF-8 (byte {exc.start})") from None


def _deeper_than(doc: Any, max_depth: int) -> bool:
    """Whether decoded ``doc`` nests more than ``max_depth`` arrays/objects (level by level)."""
    level = [doc] if isinstance(doc, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        below: list[Any] = []
        for c in level:
            below.extend(v for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, dict | list))
        level = below
    return False


def _check_depth(text: str, max_depth: int) -> None:
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot be nested deeper than it has brackets
    depth = 0
    for m in _TOKENS.finditer(text):
        ch = m.group()
        if len(ch) != 1:
            continue  # a string literal
        if ch in _OPEN:
            depth += 1
            if depth > max_depth:
                raise JsonError(f"nested more than {max_depth} levels deep")
        elif depth:
            depth -= 1


def _decode_direct(decoder: json.JSONDecoder, text: str) -> Any:
    """``decoder.decode(text)``, the same value or exception, for a text with at most MAX_DEPTH
    brackets: the C scanner called directly, without ``decode``/``raw_decode``'s two Python
    frames and two whitespace matches around it (a sixth of a small reply's decode).

    For a text that starts with a value ``decode`` calls the same ``scan_once(text, 0)`` with the
    same hooks, so a value that ends where the text ends, or an exception other than
    StopIteration, is what it gives. Leading whitespace (or none at all) is a StopIteration at 0;
    that, and a value that ends before the text (trailing whitespace, extra data), are left to
    ``decode``, which skips or words them. The bracket bound keeps the recursion far from the
    interpreter's limit, so two frames fewer cannot decide whether a RecursionError happens.
    """
    try:
        doc, end = decoder.scan_once(text, 0)
    except StopIteration:
        return decoder.decode(text)
    if end != len(text):
        return decoder.decode(text)
    return doc


@functools.lru_cache(maxsize=8)
def _decoder(max_int_digits: int) -> json.JSONDecoder:
    """One decoder per integer bound (building one per call cost a fifth of a small decode)."""

    def parse_int(s: str) -> int:
        # the sign is no digit; most integers are short enough not to ask
        if len(s) > max_int_digits and len(s) - (s[0] == "-") > max_int_digits:
            raise JsonError(f"integer of more than {max_int_digits} digits")
        return int(s)

    return json.JSONDecoder(parse_int=parse_int, parse_float=_parse_float,
                            parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def _parse_float(s: str) -> float:
    if len(s) > MAX_FLOAT_CHARS:
        raise JsonError(f"number literal of more than {MAX_FLOAT_CHARS} characters")
    value = float(s)
    if not math.isfinite(value):
        raise JsonError("number out of range")
    return value


def _refuse_constant(name: str) -> Any:
    raise JsonError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonError(f"duplicate key {key[:32]!r}")
            seen.add(key)
    return doc


def _check_surrogates(doc: Any) -> None:
    stack = [doc]
    while stack:
        cur = stack.pop()
        if isinstance(cur, str):
            if _SURROGATE.search(cur):
                raise JsonError("string with an unpaired UTF-16 surrogate")
        elif isinstance(cur, dict):
            stack.extend(cur.keys())
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)


__all__ = ["JsonError", "digits", "loads", "loads_object"]
