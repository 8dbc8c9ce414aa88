"""serve.py's lean request head and response template (``_lean_request`` / ``_lean_response``):
a small whole request for a fast route in a narrow, strict shape is read without h11 and answered
from a template; anything else goes through h11 as before.

What must hold: whatever the lean parser accepts, h11 accepts too and gives the same headers and
body (checked on hand-written hostile heads and on every byte of a good head replaced by each of a
set of bytes); the template writes exactly h11's bytes; and over a real socket the lean path and
the h11 path answer alike, keep-alive works after lean answers, and ``Connection: close``,
pipelining, duplicate Host, oversize heads, a Content-Length that does not match and a head that
stops half way are still handled by the general path (the last on trio's MockClock).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import h11
import pytest
import trio

from keytrio.actors.common import serve as serve_mod
from keytrio.actors.common.serve import _lean_request, _lean_response, serve
from tests.actors.common.serve_support import GOOD, _App, echo, read_answer


def h11_parse(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return None
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return list(request.headers), body
            else:
                return None
    except h11.RemoteProtocolError:
        return None


def agrees(data: bytes) -> bytes | None:
    """The lean parse of ``data`` when it accepts it, after checking h11 gives the same."""
    lean = _lean_request(data)
    if lean is not None:
        assert h11_parse(data) == lean, data
    return b"lean" if lean is not None else None


def with_header(line: bytes) -> bytes:
    head, body = GOOD.split(b"\r\n\r\n")
    return head + b"\r\n" + line + b"\r\n\r\n" + body


def test_a_good_request_is_lean_and_as_h11_reads_it() -> None:
    assert agrees(GOOD) == b"lean"
    assert agrees(with_header(b"X-Empty:")) == b"lean"
    assert agrees(with_header(b"X-Tabs:\t a \t b\t ")) == b"lean"
    assert agrees(GOOD.replace(b"Content-Length: 11", b"content-LENGTH:011")) == b"lean"


@pytest.mark.parametrize("data", [
    with_header(b"X-Fold: a\r\n b"),                                   # obs-fold
    with_header(b" X-Lead: a"),                                        # leading whitespace
    with_header(b"X-Space : a"),                                       # space before the colon
    with_header(b"X(bad): a"),                                         # not a token
    with_header(b"X-Nul: a\x00b"),
    with_header(b"X-Obs: caf\xe9"),                                    # obs-text: h11's call
    with_header(b"X-LF: a\nb"),                                        # bare LF inside a line
    with_header(b"X-CR: a\rb"),
    with_header(b"NoColon"),
    with_header(b"Host: other"),                                       # two Hosts
    GOOD.replace(b"Host: 127.0.0.1:8881\r\n", b""),                    # no Host
    with_header(b"Content-Length: 11"),                                # two lengths
    GOOD.replace(b"Content-Length: 11", b"Content-Length: 12"),        # length != body
    GOOD.replace(b"Content-Length: 11", b"Content-Length: 1_1"),
    GOOD.replace(b"Content-Length: 11", b"Content-Length: +11"),
    with_header(b"Connection: close"),
    with_header(b"Connection: keep-alive"),
    with_header(b"Transfer-Encoding: chunked"),
    with_header(b"Expect: 100-continue"),
    with_header(b"Upgrade: h2c"),
    with_header(b"TE: trailers"),
    with_header(b"X-Big: " + b"a" * 9000),                             # head over 8 KiB
    GOOD.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    GOOD.replace(b"PATCH /v3", b"PATCH  /v3", 1),
    GOOD.replace(b"\r\n\r\n", b"\r\n"),                                # no end of head
    GOOD.replace(b"\r\n\r\n", b"\n\n"),
    GOOD + b"GET / HTTP/1.1\r\n\r\n",                                  # pipelined (length != body)
])
def test_hostile_heads_are_left_to_h11(data: bytes) -> None:
    assert agrees(data) is None


def test_every_byte_of_the_head_replaced() -> None:
    """Each head byte replaced by each of a set of bytes: never accepted unless h11 agrees."""
    head_len = GOOD.index(b"\r\n\r\n") + 4
    accepted = 0
    for i in range(head_len):
        for b in b"\x00\t\n\r \"(),:;=@[]{}\x7f\x80\xff0aA-_/":
            data = GOOD[:i] + bytes([b]) + GOOD[i + 1:]
            accepted += agrees(data) is not None
            accepted += agrees(GOOD[:i] + bytes([b]) + GOOD[i:]) is not None  # inserted, too
    assert accepted > 0  # the harmless ones (a letter in a value) do stay lean


def h11_response(status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(GOOD)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    out = conn.send(h11.Response(status_code=status, headers=headers))
    return out + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())


DATE = (b"date", b"Fri, 04 Dec 2026 14:00:00 GMT")


@pytest.mark.parametrize(("status", "extra"), [
    (200, []), (201, [(b"location", b"/v3/agents/a1/attestations/3")]), (202, []),
    (400, []), (429, [(b"retry-after", b"7")]), (500, []), (503, [(b"Retry-After", b"1")]),
])
def test_the_template_writes_h11s_bytes(status: int, extra: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps({"status": status}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *extra, DATE]
    assert _lean_response(status, headers, payload) == h11_response(status, headers, payload)


@pytest.mark.parametrize(("status", "headers", "payload"), [
    (204, [(b"content-length", b"0")], b""),
    (304, [(b"content-length", b"0")], b""),
    (101, [(b"content-length", b"0")], b""),
    (200, [], b"x"),                                                   # no length
    (200, [(b"content-length", b"2")], b"x"),                          # wrong length
    (200, [(b"content-length", b"1"), (b"content-length", b"1")], b"x"),
    (200, [(b"content-length", b"1"), (b"connection", b"close")], b"x"),
    (200, [(b"content-length", b"1"), (b"transfer-encoding", b"chunked")], b"x"),
    (200, [(b"content-length", b"1"), (b"x-inject", b"a\r\nset-cookie: b")], b"x"),
    (200, [(b"content-length", b"1"), (b"x-trail", b"a ")], b"x"),
    (200, [(b"content-length", b"1"), (b"bad name", b"a")], b"x"),
])
def test_the_template_refuses_what_it_may_not_write(status: int, headers: list[tuple[bytes, bytes]],
                                                    payload: bytes) -> None:
    assert _lean_response(status, headers, payload) is None


# ---- over a real socket --------------------------------------------------------------------


async def start(nursery: trio.Nursery) -> int:
    _host, port = await nursery.start(partial(serve, _App(), host="127.0.0.1", port=0, keep_alive_timeout=5.0))
    return port


def no_date(head: bytes) -> bytes:
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:"))


@pytest.fixture
def lean_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each fast request was read by the lean parser (True) or by h11 (False)."""
    calls: list[bool] = []
    original = serve_mod._lean_request

    def spy(data: bytes) -> Any:
        out = original(data)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(serve_mod, "_lean_request", spy)
    return calls


async def test_lean_and_h11_answers_are_the_same_and_keep_alive_holds(nursery: trio.Nursery,
                                                                       lean_calls: list[bool]) -> None:
    port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    answers = []
    # lean, h11 (obs-text header), lean again on the same connection
    for extra in (b"", b"X-Obs: caf\xe9\r\n", b""):
        await stream.send_all(echo(extra=extra))
        answer = await read_answer(stream, buf)
        assert answer is not None
        answers.append(answer)
    assert lean_calls == [True, False, True]
    heads = {no_date(head) for head, _ in answers}
    assert heads == {b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-route: fast"
                     % len(answers[0][1])}
    assert len({body for _, body in answers}) == 1
    assert json.loads(answers[0][1])["body"] == '{"n": 1}'
    # Connection: close goes to h11: answered, then the connection ends
    await stream.send_all(echo(extra=b"Connection: close\r\n"))
    answer = await read_answer(stream, buf)
    assert answer is not None and b"connection: close" in answer[0].lower()
    assert await read_answer(stream, buf) is None
    await stream.aclose()


async def test_pipelined_duplicate_host_oversize_and_bad_length(nursery: trio.Nursery,
                                                                 lean_calls: list[bool]) -> None:
    port = await start(nursery)
    # pipelined: hypercorn answers both, in order
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    await stream.send_all(echo(b'{"n": 1}') + echo(b'{"n": 2}'))
    first, second = await read_answer(stream, buf), await read_answer(stream, buf)
    assert first is not None and second is not None
    assert json.loads(first[1])["body"] == '{"n": 1}' and json.loads(second[1])["body"] == '{"n": 2}'
    await stream.aclose()
    # two Hosts: h11 refuses it (400) and closes; the route never ran
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    await stream.send_all(echo(extra=b"Host: y\r\n"))
    answer = await read_answer(stream, buf)
    assert answer is not None and answer[0].startswith(b"HTTP/1.1 400")
    assert await read_answer(stream, buf) is None
    await stream.aclose()
    # a head over the lean limit (still a fast candidate): h11 reads it, same answer
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    await stream.send_all(echo(extra=b"X-Big: " + b"a" * 9000 + b"\r\n"))
    answer = await read_answer(stream, buf)
    assert answer is not None and answer[0].startswith(b"HTTP/1.1 200") and b"x-route: fast" in answer[0]
    assert [b"x-big", b"a" * 9000] in [[k.encode(), v.encode()] for k, v in json.loads(answer[1])["headers"]]
    await stream.aclose()
    assert lean_calls == [False, False]  # two Hosts and the oversize head: declined, h11 read them


async def test_a_head_that_stops_half_way_is_not_answered_lean(nursery: trio.Nursery, autojump_clock: Any,
                                                              lean_calls: list[bool]) -> None:
    """Slowloris on MockClock: half a head, then silence: the lean path never answers it and the
    server's idle deadline closes it; a body cut short is not answered; the next client is served."""
    port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(echo()[:40])
    with trio.fail_after(600):  # virtual time: the server's deadlines end it long before
        while await stream.receive_some(65536):
            pass
    await stream.aclose()
    # a body shorter than its Content-Length, then silence: never answered (the lean path hands
    # it to hypercorn after _FAST_WAIT, which waits for the rest); the request deadline closes it
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(echo(b'{"n": 1}').replace(b"Content-Length: 8", b"Content-Length: 9"))
    await closed_unanswered(stream, serve_mod.DEFAULT_REQUEST_TIMEOUT)
    assert lean_calls == []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(echo())
    assert await read_answer(stream, bytearray()) is not None
    assert lean_calls == [True]
    await stream.aclose()


async def closed_unanswered(stream: trio.SocketStream, within: float) -> None:
    """The server closes ``stream`` without a byte of answer, at most ``within`` (virtual)
    seconds from now."""
    t0 = trio.current_time()
    with trio.fail_after(10 * within):  # a guard: without a deadline the server never closes it
        got = await stream.receive_some(65536)
    assert got == b""
    assert trio.current_time() - t0 <= within + 1
    await stream.aclose()


async def test_a_request_that_never_ends_is_closed_by_its_deadline(nursery: trio.Nursery,
                                                                   autojump_clock: Any) -> None:
    """Slowloris past the head: a client that sends a head and part of a body, then nothing (or a
    byte now and then) holds its connection only until the request deadline, on the lean path and
    on hypercorn's; the server still serves the next client."""
    port = await start(nursery)
    timeout = serve_mod.DEFAULT_REQUEST_TIMEOUT
    slow = (b"POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    # hypercorn's path (not a fast route), silence after part of the body
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(slow)
    await closed_unanswered(stream, timeout)
    # the lean path, a byte every few seconds: each byte would have kept it waiting for ever
    body = b'{"n": "' + b"a" * 120 + b'"}'
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    request = echo(body)
    head_end = request.index(b"\r\n\r\n") + 4
    await stream.send_all(request[:head_end + 1])
    try:
        for i in range(head_end + 1, len(request) - 1):
            await trio.sleep(0.9 * serve_mod._FAST_WAIT)
            await stream.send_all(request[i:i + 1])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    with trio.fail_after(10 * timeout):
        while await stream.receive_some(65536):
            raise AssertionError("an unfinished request was answered")
    # the client notices the close at its next send or two (a byte every 0.9 s); with a deadline
    # renewed by every byte it would take the whole drip (≈ 110 s) and a timeout more
    assert trio.current_time() - t0 <= timeout + 5
    await stream.aclose()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(echo())
    assert await read_answer(stream, bytearray()) is not None
    await stream.aclose()
