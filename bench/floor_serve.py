"""What bench.floor_push and bench.floor_pull share: a bare HTTPS/1.1 server, a batched SQLite
writer, the admin routes the fleet benchmarks send, starting one as a pinned child, and the
checks of a quote and an IMA tail.

The server reads a request head with one split, a body of one Content-Length, and answers with
one write on serve.py's TLS transport (``TLSServerStream``), the connection kept; a request it
does not answer (:class:`Refused`, or input its handler cannot read) gets a 4xx and the
connection is closed. It is a measuring instrument (docs/performance.md 4c.15), not a server for
anything else: no timeouts, no limits, no validation beyond what the floors need.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from keytrio.actors.common.serve import TLSServerStream
from keytrio.protocol import ima, pcr_blob, tpm2
from keytrio.protocol.quote import decode_attest, decode_signature

JSONAPI = "application/vnd.api+json"
BATCH_SECONDS = 0.1
_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 409: "Conflict"}

Answer = tuple[int, bytes, str]  # status, JSON body, extra header lines ("name: value\r\n" each)


class Refused(Exception):
    """A request a floor does not answer: ``status`` and the connection closed."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


class Rows:
    """Rows of (agent, attestation or poll count, evaluation, when), committed in batches: one
    ``executemany`` per :data:`BATCH_SECONDS` in a worker thread (what the verifiers' group commit
    does, without its callers waiting)."""

    def __init__(self, db_path: Path) -> None:
        self.pending: list[tuple[str, int, str, float]] = []
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE attestations (agent_id TEXT, idx INTEGER, evaluation TEXT, at REAL)")

    def _commit(self, rows: list[tuple[str, int, str, float]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO attestations VALUES (?, ?, ?, ?)", rows)
        self.db.execute("COMMIT")

    async def writer(self) -> None:
        while True:
            await trio.sleep(BATCH_SECONDS)
            if self.pending:
                rows, self.pending = self.pending, []
                await trio.to_thread.run_sync(self._commit, rows)


class Handler(Protocol):
    rows: Rows

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes, client_cert: bool) -> Answer: ...


def policy_of(body: bytes) -> dict[str, set[str]]:
    """The runtime policy of an allowlist upload (bench.fleet.policy_body): path -> digests (hex)."""
    doc = json.loads(base64.b64decode(json.loads(body)["runtime_policy"]))
    return {path: set(digests) for path, digests in doc["digests"].items()}


def bulk(counts: dict[str, tuple[int, bool]]) -> Answer:
    """``GET /v2.x/agents/?bulk``: per agent (attestations passed, failed) as the fields bench.fleet reads."""
    results = {i: {"attestation_count": n, "operational_state": 10 if failed else 3} for i, (n, failed) in counts.items()}
    return 200, json.dumps({"code": 200, "status": "Success", "results": results}).encode(), ""


CREATED: Answer = (201, b'{"code": 201, "status": "Created", "results": {}}', "")
OK: Answer = (200, b'{"code": 200, "status": "Success", "results": {}}', "")


async def serve_connection(handler: Handler, sock: socket.socket, ctx: ssl.SSLContext) -> None:
    stream = TLSServerStream(sock, ctx)
    try:
        await stream.do_handshake()
        client_cert = stream.getpeercert(binary_form=True) is not None
        buf = b""
        while True:
            while (end := buf.find(b"\r\n\r\n")) < 0:
                data = await stream.receive_some()
                if not data:
                    return
                buf += data
            lines = buf[:end].decode("latin-1").split("\r\n")
            method, path, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            need = end + 4 + int(headers.get("content-length", "0"))
            while len(buf) < need:
                data = await stream.receive_some()
                if not data:
                    return
                buf += data
            body, buf = buf[end + 4 : need], buf[need:]
            close = False
            try:
                status, payload, extra = handler.answer(method, path, headers, body, client_cert)
            except Refused as exc:
                status, payload, extra, close = exc.status, json.dumps({"detail": str(exc)}).encode(), "", True
            except (LookupError, TypeError, ValueError, ArithmeticError) as exc:
                status, payload, extra, close = 400, json.dumps({"detail": repr(exc)}).encode(), "", True
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\ncontent-type: {JSONAPI}\r\n"
                    f"content-length: {len(payload)}\r\n{extra}" + ("connection: close\r\n" if close else "") + "\r\n")
            await stream.send_all(head.encode("latin-1") + payload)
            if close:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        await stream.aclose()


async def serve(ca_dir: Path, make: Callable[[Path, trio.Nursery], Handler]) -> None:
    """Listen on 127.0.0.1 (``PORT <n>`` on stdout) with the CA directory's server certificate (a
    client certificate optional, as on the verifier) until SIGTERM/SIGINT; ``make(tmp, nursery)``
    builds the handler (its store under ``tmp``, whose writer runs beside the server; its own tasks
    in ``nursery``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_dir / "cacert.crt"))
    ctx.load_cert_chain(str(ca_dir / "server-cert.crt"), str(ca_dir / "server-private.pem"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    with tempfile.TemporaryDirectory(prefix="keytrio-floor-") as tmp, \
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            handler = make(Path(tmp), nursery)
            listener = trio.socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            print(f"PORT {listener.getsockname()[1]}", flush=True)
            nursery.start_soon(handler.rows.writer)

            async def accept() -> None:
                while True:
                    conn, _ = await listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nursery.start_soon(serve_connection, handler, socket.socket(fileno=conn.detach()), ctx)

            nursery.start_soon(accept)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def start(module: str, args: list[str], cpu: int, log: Any) -> tuple[subprocess.Popen[str], str]:
    """``python -m module *args`` pinned to ``cpu`` as bench.fleet starts keytrio's verifier ->
    (the process, its base URL)."""
    from bench import fleet

    srv, port = fleet.start_child(["-m", module, *args], {cpu}, log, module)
    return srv, f"https://127.0.0.1:{port}"


class Admin:
    """The admin routes bench.fleet sends (a client certificate required, as on the verifier):
    ``POST /v2.x/allowlists/N`` (the runtime policy), ``POST /v2.x/agents/ID`` (:meth:`enrol`),
    ``GET /v2.x/agents/?bulk``. ``agents``: id -> an object with a ``seen`` (:class:`Seen`)."""

    def __init__(self) -> None:
        self.agents: dict[str, Any] = {}
        self.policy: dict[str, set[str]] = {}

    def enrol(self, agent_id: str, doc: dict[str, Any]) -> Any:
        raise NotImplementedError

    def admin(self, method: str, path: str, body: bytes, client_cert: bool) -> Answer:
        if not client_cert:
            raise Refused("a client certificate is required", 401)
        parts = path.split("?")[0].split("/")  # ["", "v2.1", "agents", ID]
        if method == "POST" and len(parts) == 4 and parts[2] == "allowlists":
            self.policy = policy_of(body)
            return CREATED
        if method == "POST" and len(parts) == 4 and parts[2] == "agents":
            if parts[3] in self.agents:
                raise Refused("enrolled already", 409)
            self.agents[parts[3]] = self.enrol(parts[3], json.loads(body))
            return OK
        if method == "GET" and len(parts) >= 3 and parts[2] == "agents":
            return bulk({i: (a.seen.count, a.seen.failed is not None) for i, a in self.agents.items()})
        raise Refused(f"no route {method} {path}", 404)


# -- the checks both floors make of a quote and an IMA tail ---------------------------------------

_PKCS1 = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())


@dataclass
class Seen:
    """What a floor keeps per agent between attestations: the verified IMA prefix and the clock."""

    next_line: int = 0  # IMA lines verified so far
    pcr10: bytes = bytes(32)  # the replay of those lines
    clock: int = -1
    count: int = 0  # attestations that passed
    failed: str | None = None


def check_quote(ak: tpm2.AkKey, message: bytes, signature: bytes, blob: bytes, nonce: bytes, pcrs: tuple[int, ...],
                seen: Seen) -> tuple[str | None, dict[int, bytes], int]:
    """(why the quote fails or None, the quoted PCR values, its TPM clock): TPMS_ATTEST and
    TPMT_SIGNATURE decoded, the nonce, the selection, the PCR values' digest, the clock against the
    last one, then one RSA verify (RSASSA/SHA-256, the simulated AKs' scheme)."""
    attest, sig = decode_attest(message), decode_signature(signature)
    bank, values = pcr_blob.decode_single(blob)
    if attest.extra_data != nonce:
        return "nonce", values, 0
    if bank != "sha256" or tuple(values) != pcrs or attest.pcr_select[0].pcrs != pcrs:
        return "selection", values, 0
    if hashlib.sha256(b"".join(values.values())).digest() != attest.pcr_digest:
        return "pcr digest", values, 0
    if attest.clock.clock < seen.clock:
        return "clock", values, 0
    if not _verify_signature(ak, sig.sig, message):
        return "signature", values, 0
    return None, values, attest.clock.clock


def _verify_signature(ak: tpm2.AkKey, sig: bytes, message: bytes) -> bool:
    # a function of its own, named as quote_check's, so that bench.sim_profile counts it apart
    try:
        ak.key.verify(sig, hashlib.sha256(message).digest(), _PKCS1, _PREHASHED)  # type: ignore[call-arg, arg-type]
    except InvalidSignature:
        return False
    return True


def check_ima(seen: Seen, text: str, start: int, pcr10: bytes, policy: dict[str, set[str]]) -> str | None:
    """The tail ``text`` of the IMA log from line ``start``: each line's file and digest in the
    policy, the replay from the verified prefix equal to the quoted PCR 10; None when it holds
    (the prefix then grows by the tail)."""
    if text:
        if start != seen.next_line:
            return f"the tail starts at line {start}, not {seen.next_line}"
        entries = ima.parse_list(text, start)
        for e in entries:
            if e.digest.hex() not in policy.get(e.path, ()):
                return f"IMA line {e.path} not in the policy"
        value = ima.replay(entries, "sha256", seen.pcr10)
        if value != pcr10:
            return "PCR 10 is not the IMA log's replay"
        seen.pcr10, seen.next_line = value, seen.next_line + len(entries)
    elif pcr10 != seen.pcr10:
        return "PCR 10 moved without IMA lines"
    return None
