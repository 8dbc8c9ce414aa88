"""serve.response_headers: hypercorn's ``Config.response_headers("h11")`` kept for the second.

Against the general path (hypercorn's own call, read around each memo answer): the same headers
in the same order, the Date equal to hypercorn's of the same second, for the default config and
configs without Date, without Server, with alt-svc, alternating (the memo is per config), and
across second boundaries of the real clock (the memo must not outlive its second). Over a real
socket, the lean path's answers carry it: tests/actors/common/test_serve_lean_head.py compares
them with h11's bytes apart from the Date.
"""

from __future__ import annotations

import time
from wsgiref.handlers import format_date_time

from hypercorn.config import Config

from keytrio.actors.common import serve


def _without_date(headers) -> list:
    return [(n, v) for n, v in headers if n != b"date"]


def _dates(headers) -> list:
    return [v for n, v in headers if n == b"date"]


def _check(config: Config) -> None:
    before = time.time()
    got = serve.response_headers(config)
    after = time.time()
    general = config.response_headers("h11")
    assert _without_date(got) == _without_date(general)
    assert [n for n, _ in got] == [n for n, _ in general]
    if config.include_date_header:
        # hypercorn's Date of a moment between the two readings
        assert _dates(got)[0] in {format_date_time(before).encode(), format_date_time(after).encode()}
        if int(before) == int(after):
            assert _dates(got) == [format_date_time(before).encode()]
    else:
        assert _dates(got) == []


def _configs() -> list[Config]:
    plain = Config()
    no_date = Config()
    no_date.include_date_header = False
    no_server = Config()
    no_server.include_server_header = False
    alt = Config()
    alt.alt_svc_headers = ['h3=":443"; ma=3600']
    return [plain, no_date, no_server, alt]


def test_same_headers_as_hypercorn_for_each_config() -> None:
    for config in _configs():
        for _ in range(3):
            _check(config)


def test_alternating_configs_each_get_their_own() -> None:
    configs = _configs()
    for _ in range(20):
        for config in configs:
            _check(config)


def test_memo_follows_the_clock_across_seconds() -> None:
    """Real time (the memo reads the wall clock, as hypercorn does): called until two second
    boundaries have passed; every answer is hypercorn's of its moment."""
    config = Config()
    start = int(time.time())
    seen = set()
    while int(time.time()) < start + 2:
        _check(config)
        seen.add(_dates(serve.response_headers(config))[0])
    assert len(seen) >= 2  # the Date changed while the memo was in use
