"""Helpers for verifier end-to-end tests: a Verifier actor on tmp SQLite with the ``pki`` fixture,
real agents (tests/actors/agent_support.py's start_agent) with a revocation cert + an action that
records each notice, enrolment by REST POST, waiting by polling GET (no fixed sleeps: every wait
polls, ``trio.fail_after`` only guards against hanging), a counting TCP relay placed in front of an
agent, and a hostile fake agent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio
from cryptography.hazmat.primitives import serialization

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier.actor import Verifier
from keytrio.actors.verifier.config import load_config
from keytrio.actors.verifier.notify import SignedNotice
from keytrio.actors.verifier.schema import notices as notices_table
from keytrio.protocol import payload as pl
from keytrio.protocol.runtime_policy import policy_document
from tests.actors.agent_support import Running, revocation_key_and_cert, start_agent
from tests.actors.registrar_support import SoftTpm

GUARD = 30.0  # seconds: a hang guard only, never what a test asserts
POLL = 0.05


# --- revocation signing pair ----------------------------------------------------------------------


@dataclass(frozen=True)
class RevocationPair:
    key_pem: str
    cert_path: Path

    @property
    def cert_pem(self) -> str:
        return self.cert_path.read_text()


def revocation_pair(directory: Path) -> RevocationPair:
    """An RSA key + self-signed cert like upstream's RevocationNotifier pair."""
    key, cert = revocation_key_and_cert()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "RevocationNotifier-cert.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode()
    return RevocationPair(pem, path)


# --- agents ---------------------------------------------------------------------------------------


@dataclass
class VAgent:
    run: Running
    tmp: Path
    tcti: str
    notices_dir: Path

    @property
    def agent_id(self) -> str:
        return self.run.info.agent_id

    @property
    def address(self) -> tuple[str, int]:
        return self.run.info.address

    def notices(self) -> list[str]:
        """The msg texts the agent's revocation action recorded (verified notices only)."""
        return [p.read_text() for p in sorted(self.notices_dir.glob("*.json"))]


async def start_test_agent(
    nursery: trio.Nursery, tmp: Path, pki: Any, tcti: str, pair: RevocationPair | None, **overrides: Any
) -> VAgent:
    """A real agent whose revocation action writes each accepted notice's msg to notices_dir."""
    tmp.mkdir(parents=True, exist_ok=True)
    actions, notices = tmp / "actions", tmp / "notices"
    actions.mkdir(exist_ok=True)
    notices.mkdir(exist_ok=True)
    script = actions / "10-record.sh"
    script.write_text(f'#!/bin/sh\nf=$(mktemp {notices}/n.XXXXXX)\ncat > "$f"\nmv "$f" "$f.json"\n')
    script.chmod(0o755)
    opts: dict[str, Any] = {"revocation_actions_dir": str(actions)}
    if pair is not None:
        opts["revocation_cert"] = str(pair.cert_path)
    opts.update(overrides)
    r = await start_agent(nursery, tmp, pki, tcti, **opts)
    return VAgent(r, tmp, tcti, notices)


# --- the verifier ---------------------------------------------------------------------------------


@dataclass
class RunningVerifier:
    verifier: Verifier
    scope: trio.CancelScope
    done: trio.Event
    url: str  # https://host:port/v2.1
    admin: httpx.AsyncClient

    async def get(self, agent_id: str) -> dict[str, Any] | None:
        resp = await self.admin.get(f"{self.url}/agents/{agent_id}")
        if resp.status_code == 404:
            return None
        assert resp.status_code == 200, resp.text
        return resp.json()["results"]

    async def call(self, method: str, path: str, body: Any = None, code: int | None = None) -> dict[str, Any]:
        if code is None:  # the success code of the route (upstream's: policies 201 / 204)
            policy = path.startswith(("/allowlists/", "/mbpolicies/"))
            code = {"POST": 201, "PUT": 201, "DELETE": 204}.get(method, 200) if policy else 200
        resp = await self.admin.request(method, self.url + path, json=body)
        assert resp.status_code == code, resp.text
        return resp.json() if resp.content else {}  # 204 (policy DELETE): no body

    async def wait(self, agent_id: str, pred: Callable[[dict[str, Any]], bool], what: str = "") -> dict[str, Any]:
        """Poll GET until ``pred(record)``; returns that record."""
        last: dict[str, Any] | None = None
        with trio.fail_after(GUARD):
            while True:
                last = await self.get(agent_id)
                if last is not None and pred(last):
                    return last
                await trio.sleep(POLL)

    async def wait_state(self, agent_id: str, state: int) -> dict[str, Any]:
        return await self.wait(agent_id, lambda r: r["operational_state"] == state)

    async def wait_count(self, agent_id: str, at_least: int) -> dict[str, Any]:
        return await self.wait(agent_id, lambda r: r["attestation_count"] >= at_least)

    async def notices(self, agent_id: str) -> list[SignedNotice]:
        """The revocation notices about ``agent_id`` as committed in the verifier's outbox table."""
        store = self.verifier.store
        assert store is not None
        t = notices_table

        def q(conn: sa.Connection) -> list[SignedNotice]:
            rows = conn.execute(sa.select(t.c.agent_id, t.c.notice_id, t.c.event_id, t.c.msg, t.c.signature)
                                .where(t.c.agent_id == agent_id).order_by(t.c.created_at))
            return [SignedNotice(*r) for r in rows]

        return await store.read(q)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the verifier's Prometheus registry (0 when absent): ``keytrio_verifier_<name>``."""
        v = self.verifier.metrics.metrics.registry.get_sample_value(f"keytrio_verifier_{name}", labels)
        return 0.0 if v is None else v

    async def stop(self) -> None:
        self.scope.cancel()
        await self.admin.aclose()
        with trio.fail_after(GUARD):
            await self.done.wait()


def verifier_options(pki: Any, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "ip": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "data_dir": str(data_dir),
        "server_cert": str(pki.server.cert),
        "server_key": str(pki.server.key),
        "client_cert": str(pki.client.cert),
        "client_key": str(pki.client.key),
        "trusted_client_ca": [str(pki.ca)],
        "trusted_server_ca": [str(pki.ca)],
        "quote_interval": 0.2,
        # one process: auto would run a supervisor + one worker per core on PostgreSQL, and a test
        # that SIGKILLs "the verifier" means this process (test_workers.py covers N workers)
        "workers": 1,
        "retry_interval": 0.1,
        "max_retries": 3,
        "exponential_backoff": False,
        "request_timeout": 5.0,
        "max_response_size": 1 << 20,
        "graceful_timeout": 0.5,
    }
    opts.update(overrides)
    return opts


async def start_verifier(
    nursery: trio.Nursery, pki: Any, data_dir: Path, *, ima_check_for: Any = None,
    clock: Callable[[], float] = time.time, **overrides: Any
) -> RunningVerifier:
    config = load_config(env={}, overrides=verifier_options(pki, data_dir, **overrides))
    verifier = Verifier(config, ima_check_for=ima_check_for, clock=clock)
    scope, done = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await verifier.run(task_status=task_status)
        finally:
            done.set()

    host, port = await nursery.start(run)
    admin = make_client(tls.client_context([pki.ca], pki.client.cert, pki.client.key), timeout=20.0)
    return RunningVerifier(verifier, scope, done, f"https://{host}:{port}/v2.1", admin)


def enrol_body(
    agent: VAgent,
    *,
    v: bytes,
    tpm_policy: dict[str, Any] | None = None,
    revocation_key: str = "",
    address: tuple[str, int] | None = None,
    ak_public: bytes | None = None,
    mtls_cert: str | None = None,
) -> dict[str, Any]:
    """Every field upstream's tenant sends."""
    host, port = address or agent.address
    return {
        "v": base64.b64encode(v).decode(),
        "cloudagent_ip": host,
        "cloudagent_port": port,
        "tpm_policy": json.dumps(tpm_policy or {"mask": "0x0"}),
        "runtime_policy": "",
        "runtime_policy_name": None,
        "runtime_policy_key": "",
        "mb_policy": None,
        "mb_policy_name": None,
        "ima_sign_verification_keys": "[]",
        "metadata": json.dumps({"test": agent.agent_id[:8]}),
        "revocation_key": revocation_key,
        "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
        "accept_tpm_encryption_algs": ["ecc", "rsa"],
        "accept_tpm_signing_algs": ["ecschnorr", "rsassa"],
        "ak_tpm": base64.b64encode(ak_public or agent.run.info.ak_public).decode(),
        "mtls_cert": mtls_cert or agent.run.info.mtls_cert,
        "supported_version": "2.1",
    }


async def enrol(rv: RunningVerifier, agent_id: str, body: dict[str, Any]) -> None:
    await rv.call("POST", f"/agents/{agent_id}", body)


def new_halves() -> pl.KeyHalves:
    return pl.new_key_halves(os.urandom(64))


async def post_u_and_verify(agent: VAgent, halves: pl.KeyHalves) -> None:
    """Give the agent U (V came from the verifier) and check K by keys/verify."""
    r = agent.run
    body = {"encrypted_key": pl.encrypt_key_half(r.info.nk_pem, halves.u),
            "auth_tag": pl.auth_tag(halves.k, r.info.agent_id)}
    resp = await r.post("/keys/ukey", body)
    assert resp.status_code == 200, resp.text
    with trio.fail_after(GUARD):
        while True:  # U and V may be combined asynchronously: poll until K is there
            resp = await r.get("/keys/verify", challenge="chal1234")
            if resp.status_code == 200:
                break
            await trio.sleep(POLL)
    assert resp.json()["results"]["hmac"] == pl.verify_hmac(halves.k, "chal1234")


async def wait_notices(agent: VAgent, count: int) -> list[str]:
    with trio.fail_after(GUARD):
        while len(found := agent.notices()) < count:
            await trio.sleep(POLL)
    return found


# --- a counting TCP relay in front of an agent ----------------------------------------------------


@dataclass
class Relay:
    """Forwards TCP to ``target``; counts client->agent bytes and open connections."""

    target: tuple[str, int]
    bytes_up: int = 0
    connections: int = 0
    open: int = 0
    port: int = 0

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        try:
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, True, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, False, nursery.cancel_scope)
        finally:
            self.open -= 1
            await client.aclose()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, up: bool, scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                if up:
                    self.bytes_up += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()


# --- a hostile "agent" ----------------------------------------------------------------------------


HOSTILE_MODES = ("garbage", "huge", "wrong_types")


@dataclass
class HostileAgent:
    """HTTPS with the agent-style cert of ``pki.agent``; answers every request per ``mode``."""

    mode: str
    requests: int = 0
    port: int = 0
    paths: list[str] = field(default_factory=list)

    async def run(self, pki: Any, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = tls.server_context(pki.agent.cert, pki.agent.key, mode="none")
        listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
        self.port = listeners[0].transport_listener.socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def _response(self) -> bytes:
        if self.mode == "garbage":
            body = b"\x00\xffthis is {not json"
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        if self.mode == "huge":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            return head + b'{"code": 200, "status": "ok", "results": {"quote": "' + b"A" * (3 << 20)
        results = {"quote": 12, "hash_alg": ["sha256"], "enc_alg": None, "sign_alg": {"x": 1},
                   "pubkey": 5, "boottime": "yesterday", "ima_measurement_list_entry": -1}
        body = json.dumps({"code": 200, "status": "Success", "results": results}).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body)) + body

    async def _handle(self, stream: trio.SSLStream) -> None:
        try:
            head = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            self.requests += 1
            self.paths.append(head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else "")
            await stream.send_all(self._response())
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


# --- a plain-HTTP webhook receiver ----------------------------------------------------------------


@dataclass
class Webhook:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                body += chunk
            self.bodies.append(json.loads(body))
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await stream.aclose()


# --- a TLS-terminating proxy that records the requests sent to an agent ------------------------------


@dataclass
class RecordingProxy:
    """Terminates the verifier's TLS with ``pki.agent``'s cert (enrol with ``mtls_cert=pki.agent.pem``),
    records every request target, and forwards the bytes to the real agent over mTLS (pinned)."""

    pki: Any
    target: tuple[str, int]
    agent_cert_pem: str
    paths: list[str] = field(default_factory=list)
    port: int = 0

    def integrity_params(self) -> list[dict[str, str]]:
        """The query of every ``quotes/integrity`` request, in order."""
        from urllib.parse import parse_qsl, urlsplit

        return [dict(parse_qsl(urlsplit(p).query)) for p in self.paths if "/quotes/integrity" in p]

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = tls.server_context(self.pki.agent.cert, self.pki.agent.key, mode="none")
        listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
        self.port = listeners[0].transport_listener.socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, down: trio.SSLStream) -> None:
        cctx = tls.client_context([self.pki.ca], self.pki.client.cert, self.pki.client.key,
                                  pinned_server_cert_pem=self.agent_cert_pem)
        try:
            up = await trio.open_ssl_over_tcp_stream(*self.target, ssl_context=cctx, https_compatible=True)
        except (OSError, trio.BrokenResourceError):
            await down.aclose()
            return
        async with up, down, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, down, up, True, nursery.cancel_scope)
            nursery.start_soon(self._pump, up, down, False, nursery.cancel_scope)

    async def _pump(self, src: trio.SSLStream, dst: trio.SSLStream, record: bool, scope: trio.CancelScope) -> None:
        import re

        tail = b""
        try:
            while data := await src.receive_some(65536):
                if record:
                    buf = tail + data
                    for m in re.finditer(rb"(?:GET|POST|PUT|DELETE) (\S+) HTTP/1\.1\r\n", buf):
                        self.paths.append(m.group(1).decode("latin-1"))
                    # keep an incomplete request line for the next chunk
                    cut = buf.rfind(b"\r\n")
                    tail = buf[cut + 2:][-4096:] if cut >= 0 else buf[-4096:]
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            scope.cancel()


# --- runtime policies and enrolment bodies without a running agent ------------------------------------

BANKS = ["sha1", "sha256", "sha384"]
BASE = {f"/usr/bin/tool{i}": f"content {i}".encode() for i in range(3)}
#: the tpm_policy of :func:`soft_enrol_body`: PCR 15 all zeros
PCR15_POLICY = json.dumps({"15": ["00" * 32], "mask": "0x8000"})


def policy_doc(files: dict[str, bytes], excludes: tuple[str, ...] = ()) -> dict[str, Any]:
    """A runtime policy allowing exactly ``files`` (path -> content)."""
    return policy_document(meta={"version": 1, "generator": 3}, excludes=list(excludes),
                           digests={p: [hashlib.sha256(c).hexdigest()] for p, c in files.items()})


def doc_b64(doc: dict[str, Any]) -> str:
    """A JSON document as the base64 text the verifier's policy fields carry."""
    return base64.b64encode(json.dumps(doc).encode()).decode()


def soft_enrol_body(soft: SoftTpm, pki: Any, **changes: Any) -> dict[str, Any]:
    """What upstream's tenant sends (some lists as JSON text, as it does), for an AK of ``soft``."""
    doc: dict[str, Any] = {
        "v": base64.b64encode(bytes(range(32))).decode(),
        "cloudagent_ip": "127.0.0.1",
        "cloudagent_port": 9002,
        "tpm_policy": PCR15_POLICY,
        "runtime_policy": "",
        "runtime_policy_name": None,
        "runtime_policy_key": "",
        "mb_policy": None,
        "mb_policy_name": None,
        "ima_sign_verification_keys": "[]",
        "metadata": "{}",
        "revocation_key": pki.agent.key.read_text(),
        "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
        "accept_tpm_encryption_algs": json.dumps(["ecc", "rsa"]),
        "accept_tpm_signing_algs": ["ecschnorr", "rsassa", "ecdsa"],
        "ak_tpm": soft.aik_tpm,
        "mtls_cert": pki.agent.cert.read_text(),
        "supported_version": "2.1",
    }
    doc.update(changes)
    return doc
