"""RawConn.is_readable on sockets numbered past select()'s FD_SETSIZE (a verifier of 1,000+ agents)."""

from __future__ import annotations

import os
import socket

from keytrio.actors.common.rawconn import RawConn

HIGH_FD = 1500  # past FD_SETSIZE (1024): select() refuses such descriptors


def _high(sock: socket.socket) -> socket.socket:
    fd = os.dup2(sock.fileno(), HIGH_FD)
    sock.close()
    return socket.socket(fileno=fd)


def test_is_readable_past_fd_setsize() -> None:
    mine, peer = socket.socketpair()
    conn = RawConn(_high(mine))
    try:
        assert not conn.is_readable()  # idle: reusable
        peer.send(b"x")
        assert conn.is_readable()  # something unasked waits: not reusable
    finally:
        conn.close(notify=False)
        peer.close()


def test_is_readable_at_eof_past_fd_setsize() -> None:
    mine, peer = socket.socketpair()
    conn = RawConn(_high(mine))
    try:
        peer.close()
        assert conn.is_readable()  # the peer closed it
    finally:
        conn.close(notify=False)


def test_the_idle_peek_leaves_the_byte_and_uses_the_same_flags() -> None:
    # the flags are a plain int now (no IntFlag operation per poll): the same bits as before
    from keytrio.actors.common import rawconn

    assert rawconn._PEEK_FLAGS == int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
    assert type(rawconn._PEEK_FLAGS) is int
    mine, peer = socket.socketpair()
    conn = RawConn(mine)
    try:
        assert not conn.is_readable()
        peer.send(b"xy")
        assert conn.is_readable() and conn.is_readable()  # a peek: asking twice sees it twice
        assert mine.recv(8) == b"xy"  # nothing was consumed
        assert not conn.is_readable()
    finally:
        conn.close(notify=False)
        peer.close()
