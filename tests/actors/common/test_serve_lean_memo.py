"""serve.py's lean head and template with their header-line memos (``_REQUEST_LINES``,
``_RESPONSE_LINES``) against the code they replaced, kept verbatim as the reference in bench/micro_push_serve.py
(``before_request`` / ``before_response``: one regex match per line, no memo).

Every request and answer is given cold (memos emptied), warm (the same again) and after the memos
were filled by other lines, and must give exactly what the reference gives: accepted or refused,
the same headers (names, values, order) and body, the same response bytes. The inputs: good heads,
the hostile heads of test_serve_lean_head, every byte of a good head's header lines replaced or
inserted, and answers with good, refused, bytearray and overlong headers. The memos must stay
bounded and must not keep long lines.
"""

from __future__ import annotations

import itertools

import pytest

# the code the memos replaced, verbatim (one copy, the microbenchmark's "before" side)
from bench.micro_push_serve import before_request as reference_request
from bench.micro_push_serve import before_response as reference_response
from keytrio.actors.common import serve as serve_mod
from keytrio.actors.common.serve import _lean_request, _lean_response
from tests.actors.common.serve_support import GOOD


def _requests() -> list[bytes]:
    head, body = GOOD.split(b"\r\n\r\n")
    out = [GOOD, GOOD.replace(b"Content-Length: 11", b"content-LENGTH:011")]
    for line in [b"X-Empty:", b"X-Tabs:\t a \t b\t ", b"X-Fold: a\r\n b", b" X-Lead: a", b"X-Space : a",
                 b"X(bad): a", b"X-Nul: a\x00b", b"X-Obs: caf\xe9", b"X-LF: a\nb", b"X-CR: a\rb", b"NoColon",
                 b"Host: other", b"Content-Length: 11", b"Connection: close", b"Transfer-Encoding: chunked",
                 b"Expect: 100-continue", b"Upgrade: h2c", b"TE: trailers", b"X-Big: " + b"a" * 9000,
                 b"X-Long: " + b"b" * 300, b"Keep-Alive: 5", b"Trailer: x", b"HTTP2-Settings: x"]:
        out.append(head + b"\r\n" + line + b"\r\n\r\n" + body)
    out.append(GOOD.replace(b"Content-Length: 11", b"Content-Length: 12"))
    out.append(GOOD.replace(b"Host: 127.0.0.1:8881\r\n", b""))
    start = GOOD.index(b"\r\n") + 2
    for i in range(start, GOOD.index(b"\r\n\r\n")):
        for b in b"\x00\t\n\r :\x7f\x80\xff0aA-":
            out.append(GOOD[:i] + bytes([b]) + GOOD[i + 1:])
            out.append(GOOD[:i] + bytes([b]) + GOOD[i:])
    return out


def _clear() -> None:
    serve_mod._REQUEST_LINES.clear()
    serve_mod._RESPONSE_LINES.clear()


def test_the_request_memo_gives_what_the_regex_gave() -> None:
    requests = _requests()
    _clear()
    seen = {True: 0, False: 0}
    for data in requests:  # cold for each first line, then warm, in one order ...
        want = reference_request(data)
        assert _lean_request(data) == want, data
        assert _lean_request(data) == want, data
        seen[want is not None] += 1
    for data in reversed(requests):  # ... and with the memo filled by every other request
        assert _lean_request(data) == reference_request(data), data
    assert seen[True] > 10 and seen[False] > 100  # both outcomes reached


def test_the_response_memo_gives_what_the_regex_gave() -> None:
    payload = b'{"a": 1}'
    length = (b"content-length", b"8")
    extras: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"), (b"location", b"/v3/agents/a/attestations/3"),
        (b"Retry-After", b"7"), (b"date", b"Fri, 04 Dec 2026 14:00:00 GMT"), (b"server", b"hypercorn-h11"),
        (b"x-inject", b"a\r\nset-cookie: b"), (b"x-trail", b"a "), (b"bad name", b"a"), (b"connection", b"close"),
        (b"Transfer-Encoding", b"chunked"), (b"x-empty", b""), (b"x-long", b"c" * 300), (b"x-obs", b"caf\xe9"),
        (b"content-length", b"9"), (b"Content-Length", b"8"),
    ]
    _clear()
    cases = 0
    for status in (200, 201, 202, 204, 304, 404, 429, 500, 101):
        for a, b in itertools.product(extras, repeat=2):
            for headers in ([length, a, b], [a, length, b], [a, b]):
                want = reference_response(status, headers, payload)
                assert _lean_response(status, headers, payload) == want, (status, headers)
                assert _lean_response(status, headers, payload) == want, (status, headers)
                cases += want is not None
    assert cases > 100
    # bytearray values or names (not hashable: not kept) give the same too, a TypeError included
    for headers in ([(b"content-length", bytearray(b"8")), (b"x", bytearray(b"y"))],
                    [(bytearray(b"content-length"), b"8")], [length, (b"x", bytearray(b"a\r\nb"))]):
        assert _outcome(_lean_response, headers, payload) == _outcome(reference_response, headers, payload)


def _outcome(fn: object, headers: list[tuple[bytes, bytes]], payload: bytes) -> object:
    try:
        return fn(200, headers, payload)  # type: ignore[operator]
    except Exception as exc:  # the same exception type as the reference's is the same outcome
        return type(exc)


def test_the_memos_stay_bounded_and_keep_no_long_lines() -> None:
    _clear()
    head, body = GOOD.split(b"\r\n\r\n")
    for i in range(serve_mod._LINE_MEMO_MAX + 50):
        data = head + b"\r\nX-N: %d\r\n\r\n" % i + body
        assert _lean_request(data) == reference_request(data)
        headers = [(b"content-length", b"11"), (b"x-n", b"%d" % i)]
        assert _lean_response(200, headers, body) == reference_response(200, headers, body)
        assert len(serve_mod._REQUEST_LINES) <= serve_mod._LINE_MEMO_MAX
        assert len(serve_mod._RESPONSE_LINES) <= serve_mod._LINE_MEMO_MAX
    _clear()
    long_line = b"X-Long: " + b"d" * serve_mod._LINE_MEMO_LEN
    data = head + b"\r\n" + long_line + b"\r\n\r\n" + body
    assert _lean_request(data) == reference_request(data) is not None
    assert long_line not in serve_mod._REQUEST_LINES
    headers = [(b"content-length", b"11"), (b"x-long", b"d" * serve_mod._LINE_MEMO_LEN)]
    assert _lean_response(200, headers, body) == reference_response(200, headers, body) is not None
    assert (b"x-long", b"d" * serve_mod._LINE_MEMO_LEN) not in serve_mod._RESPONSE_LINES


@pytest.fixture(autouse=True)
def _empty_memos() -> object:
    yield
    _clear()
