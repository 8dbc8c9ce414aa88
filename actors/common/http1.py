"""The HTTP/1.1 client exchange of :class:`actors.common.client.KeepAliveClient`: bytes out, one
response in, over any stream with ``receive_some``.

The verifier's monitors send one fixed kind of request per poll and read one short reply; h11's
general machinery (event objects, a state machine, header validation by regex on both sides)
was a sixth of a poll's CPU. This module does only what that exchange needs, strictly:
status line ``HTTP/1.x NNN reason``, header fields (token names, no obs-fold, no control
characters), a body framed by one Content-Length or ``Transfer-Encoding: chunked`` (any other
transfer coding is refused), or, with neither, until EOF. 1xx responses are skipped; 101 is
refused. Limits: the head (status line + fields, or a chunk trailer) at most ``MAX_HEAD``
bytes, the body at most the caller's limit (a larger Content-Length is refused before reading).
A response whose framing is violated raises :class:`ProtocolViolation`; one that the connection
cannot carry a next request after (``Connection: close``, HTTP/1.0, read to EOF, stray bytes
after it) comes back with ``reusable`` False.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Protocol

MAX_HEAD = 64 << 10
_RECEIVE = 65536

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_FIELDS = re.compile(rb"(?:" + _FIELD.pattern + rb"\r\n)*" + _FIELD.pattern)
_FIELD_LINE = re.compile(_FIELD.pattern + rb"(?:\r\n|\Z)")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_BAD_REQUEST_CHARS = re.compile(r"[\x00-\x20\x7f]")


class Receiver(Protocol):
    """What :class:`Exchange` reads from (a trio stream, or :class:`~actors.common.rawconn.RawConn`)."""

    async def receive_some(self, max_bytes: int) -> bytes: ...


class ProtocolViolation(Exception):
    """The peer's bytes are not a well-formed HTTP/1.1 response (or the request could not be made)."""


class BodyTooLarge(Exception):
    """The body is (or is declared) larger than the caller's limit."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class BadEncoding(Exception):
    """A Content-Encoding other than identity (we ask for none)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Response(NamedTuple):
    status: int
    reason: str
    body: bytes
    reusable: bool


def request_bytes(method: str, target: str, hostport: str, body: bytes | None) -> bytes:
    """The request head (+ body); ProtocolViolation for a method/target/host that would break it."""
    if _BAD_REQUEST_CHARS.search(method) or _BAD_REQUEST_CHARS.search(target) \
            or _BAD_REQUEST_CHARS.search(hostport) or not method or not target:
        raise ProtocolViolation("invalid request line or Host")
    head = f"{method} {target} HTTP/1.1\r\nHost: {hostport}\r\nAccept: */*\r\nUser-Agent: keytrio\r\n"
    if body is None:
        return (head + "\r\n").encode("ascii")
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("ascii") + body


class KnownHead:
    """The head of a response the general parser read, as ``prefix + <Content-Length digits> +
    suffix``, with what the parser concluded from it.

    A given peer (the verifier's monitor: one agent) sends the same head every time but for the
    Content-Length value; parsing it field by field was most of a poll's HTTP exchange. A head that
    is byte for byte ``prefix``, 1-19 ASCII digits, ``suffix`` gets the same conclusions as the one
    the parser read, because the parser's verdict depends on nothing else: every other byte is the
    same, and the value is checked here as the parser checks it (digits, within the caller's
    limit). Anything else (another field, a Date that changed, a 1xx first, a reply not all
    arrived yet, a larger body than the limit) goes to the general parser, before a byte is
    consumed.
    """

    __slots__ = ("prefix", "reason", "status", "suffix")

    def __init__(self, prefix: bytes, suffix: bytes, status: int, reason: str) -> None:
        self.prefix = prefix
        self.suffix = suffix  # from the CRLF after the value through the head's closing CRLFCRLF
        self.status = status
        self.reason = reason

    def match(self, buf: bytearray, limit: int) -> tuple[int, int] | None:
        """(head length, body size) when ``buf`` starts with this head, else None."""
        if not buf.startswith(self.prefix):
            return None
        start = len(self.prefix)
        end = buf.find(b"\r\n", start, start + 21)
        if end < 0:
            return None
        digits = buf[start:end]
        if not digits.isdigit():  # bytes: ASCII 0-9 only; empty is not
            return None
        stop = end + len(self.suffix)
        if buf[end:stop] != self.suffix:
            return None
        size = int(digits)
        if size > limit:
            return None  # the general parser raises BodyTooLarge as it always does
        return stop, size


def _known_head(head: bytes, fields_at: int, status: int, reason: str) -> KnownHead | None:
    """The KnownHead of a head the parser accepted with one Content-Length field, or None when
    its value is not alone between the colon's whitespace and the CRLF, or the head is long (the
    general path's MAX_HEAD rule then stays the only one)."""
    if len(head) > 4096:
        return None
    at = fields_at
    while at < len(head):
        end = head.find(b"\r\n", at)
        if end < 0:
            end = len(head)
        colon = head.find(b":", at, end)
        if colon > at and head[at:colon].lower() == b"content-length":
            raw = head[colon + 1:end]
            start = colon + 1 + len(raw) - len(raw.lstrip(b" \t"))
            if not 0 < end - start <= 19 or not head[start:end].isdigit():
                return None  # e.g. whitespace after the value: such heads stay with the parser
            return KnownHead(head[:start], head[end:] + b"\r\n\r\n", status, reason)
        at = end + 2
    return None


class Exchange:
    """Reads one response from ``stream``; ``got_any`` tells whether any byte came back (a reused
    connection that the peer closed just before our request gets none: the caller may retry).

    ``known``: the head the previous response of this peer had (see :class:`KnownHead`); ``hit``
    tells whether this response had it. With ``learn``, after :meth:`read` ``known`` is this
    response's head when it can serve as one (else unchanged)."""

    def __init__(self, stream: Receiver, known: KnownHead | None = None, *, learn: bool = True) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._eof = False
        self.got_any = False
        self.known = known
        self.hit = False
        self._learn = learn

    async def _more(self) -> None:
        if self._eof:
            raise ProtocolViolation("connection closed before the response ended")
        data = await self._stream.receive_some(_RECEIVE)
        if not data:
            self._eof = True
            raise ProtocolViolation("connection closed before the response ended")
        self.got_any = True
        self._buf += data

    async def _line_block(self, end: bytes) -> bytes:
        """Bytes up to ``end`` (consumed with it), at most MAX_HEAD."""
        start = 0
        while True:
            at = self._buf.find(end, start)
            if at >= 0:
                block = bytes(self._buf[:at])
                del self._buf[:at + len(end)]
                return block
            if len(self._buf) > MAX_HEAD:
                raise ProtocolViolation("response head too large")
            start = max(0, len(self._buf) - len(end) + 1)
            await self._more()

    async def read(self, limit: int) -> Response:
        known = self.known
        if known is not None:
            if not self._buf:
                await self._more()  # the general path would wait for the first bytes the same way
            hit = known.match(self._buf, limit)
            if hit is not None:
                head_len, size = hit
                del self._buf[:head_len]
                while len(self._buf) < size:
                    await self._more()
                body = bytes(self._buf[:size])
                del self._buf[:size]
                self.hit = True
                return Response(known.status, known.reason, body, not self._buf)
        while True:
            head = await self._line_block(b"\r\n\r\n")
            status_line, _, fields_block = head.partition(b"\r\n")
            m = _STATUS.fullmatch(status_line)
            if m is None:
                raise ProtocolViolation("malformed status line")
            status = int(m[2])
            fields = _fields(fields_block)
            if status == 101:
                raise ProtocolViolation("unexpected protocol switch")
            if 100 <= status < 200:
                continue  # informational: the real response follows
            break
        reason = (m[3] or b"").decode("latin-1")
        reusable = m[1] == b"1"
        lengths, te = [], None
        for name, value in fields:
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                if te is not None:
                    raise ProtocolViolation("more than one Transfer-Encoding")
                te = value.lower()
            elif name == b"content-encoding" and value.lower() not in (b"", b"identity"):
                raise BadEncoding(status, f"unexpected Content-Encoding {value.decode('latin-1')!r}")
            elif name == b"connection" and b"close" in value.lower():
                reusable = False
        if status in (204, 304):
            body = b""
        elif te is not None:
            if te != b"chunked" or lengths:
                raise ProtocolViolation("unsupported Transfer-Encoding")
            body = await self._chunked(status, limit)
        elif lengths:
            if any(not v.isdigit() or len(v) > 20 for v in lengths) or len(set(lengths)) != 1:
                raise ProtocolViolation("invalid Content-Length")
            size = int(lengths[0])
            if size > limit:
                raise BodyTooLarge(status, f"Content-Length {size} > {limit} bytes")
            while len(self._buf) < size:
                await self._more()
            body = bytes(self._buf[:size])
            del self._buf[:size]
            if self._learn and reusable and len(lengths) == 1 \
                    and status_line.startswith(b"HTTP/1.1 "):
                self.known = _known_head(head, len(status_line) + 2, status, reason) or self.known
        else:  # delimited by the end of the connection
            while not self._eof:
                if len(self._buf) > limit:
                    raise BodyTooLarge(status, f"more than {limit} bytes")
                data = await self._stream.receive_some(_RECEIVE)
                if not data:
                    self._eof = True
                self._buf += data
            if len(self._buf) > limit:
                raise BodyTooLarge(status, f"more than {limit} bytes")
            body, reusable = bytes(self._buf), False
            self._buf.clear()
        if self._buf:  # bytes nobody asked for: do not read the next reply out of them
            reusable = False
        return Response(status, reason, body, reusable)

    async def _chunked(self, status: int, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = await self._line_block(b"\r\n")
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise ProtocolViolation("malformed chunk size")
            size = int(m[1], 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise BodyTooLarge(status, f"more than {limit} bytes")
            while len(self._buf) < size + 2:
                await self._more()
            if self._buf[size:size + 2] != b"\r\n":
                raise ProtocolViolation("malformed chunk")
            parts.append(bytes(self._buf[:size]))
            del self._buf[:size + 2]
        trailer = 0
        while True:  # trailer fields up to an empty line (ignored)
            line = await self._line_block(b"\r\n")
            if not line:
                return b"".join(parts)
            trailer += len(line) + 2
            if trailer > MAX_HEAD:
                raise ProtocolViolation("chunk trailer too large")
            _fields(line)


def _fields(block: bytes) -> list[tuple[bytes, bytes]]:
    if not block:
        return []
    # one C pass checks every line, one more takes them apart (a value cannot span lines: CR and
    # LF are outside its class)
    if _FIELDS.fullmatch(block) is None:
        raise ProtocolViolation("malformed header field")
    return [(name.lower(), value) for name, value in _FIELD_LINE.findall(block)]
