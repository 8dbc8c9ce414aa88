"""Free loopback ports for tests that start real servers or need a port nobody listens on."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port(consecutive: int = 1) -> int:
    """A port p with p .. p + consecutive - 1 free right now."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if consecutive == 1:
            return port
        if port + consecutive > 65535:
            continue
        try:
            with _bound(range(port + 1, port + consecutive)):
                return port
        except OSError:
            continue


@contextmanager
def _bound(ports: range) -> Iterator[None]:
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
        yield
    finally:
        for s in socks:
            s.close()
