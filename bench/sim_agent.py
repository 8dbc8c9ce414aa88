"""Simulated agents: hundreds per process, software EK/AK, real RSA-2048 quotes, no swtpm.

One ``SimAgents`` is one trio task group serving many agents behind **one TCP port**: agent ``i``
has its own loopback address (``127.100.0.1``, ``127.100.0.2``, ... every 127/8 address is local
on Linux) and the server routes each accepted connection by the address it was made to
(``getsockname``), before the TLS handshake. Why not one port per agent: thousands of listening
sockets and accept tasks for nothing, while a real fleet looks exactly like this (many hosts,
one agent port). The verifier keeps one keep-alive connection per agent either way.

Each agent holds (bench.sim_keys) an RSA-2048 EK and AK of its own, a PCR bank (sha256) that it
extends itself, a TPM clock, and an IMA log (``boot_aggregate`` over PCRs 0-7, then files of the
bench runtime policy, ``bench.gen.entry_for``) whose replay is PCR 10. PCR 16 binds the process's
NK (its mTLS key, as the real agent's): H(0 || H(NK PEM)). A quote is a TPMS_ATTEST built here
(magic, TPM_ST_ATTEST_QUOTE, AK name, the nonce, clock, the selection and the digest of the
selected PCRs) and signed with the AK (RSASSA-PKCS1-v1_5 / SHA-256), in Keylime's quote string
with ``tpm2_quote``'s PCR blob (protocol.quote). The agent's pull API v2.1 (``GET /version``,
``/quotes/integrity``, ``/quotes/identity``, ``/keys/pubkey``, ``POST /keys/ukey|vkey``) is served
over HTTPS that requires a client cert from the verifier's CA, as keytrio's agent does; h11 on
trio's SSLStream instead of hypercorn + quart, so the load generator costs a fraction of a real
agent per poll. U/V halves are accepted (200) and dropped: no payloads.

Simplifications (the verifier cannot tell): all agents of a process share one NK/mTLS cert; a
``tamper`` agent serves its last IMA line with a changed file digest (the PCR keeps the original).

    python -m bench.sim_agent CLIENT_CA_PEM POLICY_FILES MAX_AGENTS [OFFSET STRIDE]
        # JSON lines on stdin/stdout (bench.sim_fleet); with OFFSET/STRIDE this process holds the
        # fleet's agents OFFSET, OFFSET + STRIDE, ... (sim_fleet --agent-procs K: offsets 0..K-1, stride K)
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import random
import ssl
import struct
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench import gen, sim_keys
from keytrio.actors.common import tls
from keytrio.protocol import credential, ima, tpm2, validation
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.ima import IMA_PCR
from keytrio.protocol.quote import build_quote, encode_pcr_blob
from keytrio.protocol.quote_check import PCR_16
from keytrio.protocol.versions import agent_version_payload
from keytrio.protocol.wire import BootLog, IdentityQuote, ImaTail, IntegrityQuote

log = logging.getLogger("bench.sim_agent")

BANK = "sha256"
FILES_PER_AGENT = 5
API = "2.1"
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_ATTEST_HEAD = struct.pack(">IH", 0xFF544347, 0x8018)  # TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE
_SIG_HEAD = struct.pack(">HHH", 0x0014, 0x000B, 256)  # TPM_ALG_RSASSA, TPM_ALG_SHA256, 2048-bit sig
#: PCRs 0-7 of every simulated machine (one hardware model, one firmware): the boot_aggregate
BOOT_PCRS = {i: hashlib.sha256(f"sim boot pcr {i}".encode()).digest() for i in range(8)}
BOOTTIME = int(time.time()) - 3600


def address(i: int) -> str:
    """Loopback address of agent ``i``: 127.100.0.1, ... (last octet 1-250)."""
    third, fourth = divmod(i, 250)
    return f"127.{100 + third // 256}.{third % 256}.{fourth + 1}"


def agent_uuid(i: int, salt: str = "sim") -> str:
    return str(uuidlib.UUID(int=random.Random(f"{salt}:{i}").getrandbits(128), version=4))


def boot_aggregate_entry() -> ima.Entry:
    return ima.boot_aggregate_entry(BANK, BOOT_PCRS)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass
class SimAgent:
    """One simulated machine: keys, PCRs, clock, IMA log; ``quote`` signs for real."""

    index: int
    agent_id: str
    ip: str
    ek: rsa.RSAPrivateKey
    ak: rsa.RSAPrivateKey
    nk_pem: str
    files: list[ima.Entry]
    tamper: bool = False
    pcrs: dict[int, bytes] = field(default_factory=dict)
    clock_ms: int = 0
    reset_count: int = 0
    restart_count: int = 0

    def __post_init__(self) -> None:
        self.ek_public = sim_keys.ek_public(self.ek)
        self.ak_public = sim_keys.ak_public(self.ak)
        self.ak_name = tpm2.object_name(self.ak_public)
        self.entries = [boot_aggregate_entry(), *self.files]
        self.lines = [ima.format_line(e) + "\n" for e in self.entries]
        if self.tamper:  # the file digest of the last line changes; PCR 10 keeps the original
            e = self.entries[-1]
            forged = dataclasses.replace(e, digest=hashlib.sha256(b"forged").digest())
            self.lines[-1] = ima.format_line(forged) + "\n"
        self.pcrs = {i: bytes(32) for i in range(24)}
        self.pcrs.update(BOOT_PCRS)
        self.pcrs[IMA_PCR] = ima.replay(self.entries, BANK)
        self.pcrs[PCR_16] = tpm2.pcr16_binding_value(BANK, self.nk_pem)
        self._t0 = time.monotonic()
        self._clock0 = random.Random(self.agent_id).randrange(1 << 30)

    def describe(self, port: int, mtls_cert: str) -> dict[str, Any]:
        return {"index": self.index, "id": self.agent_id, "ip": self.ip, "port": port, "mtls_cert": mtls_cert,
                "ak_tpm": base64.b64encode(self.ak_public.marshal()).decode(),
                "boot_aggregate": self.entries[0].digest.hex()}  # fmt: skip

    def _clock(self) -> int:
        # TPM clock: milliseconds, never backwards, strictly increasing from quote to quote
        self.clock_ms = max(self.clock_ms + 1, self._clock0 + int((time.monotonic() - self._t0) * 1000))
        return self.clock_ms

    def quote(self, nonce: bytes, pcrs: set[int]) -> str:
        sel = sorted(set(pcrs) | {PCR_16})
        bits = 0
        for p in sel:
            bits |= 1 << p
        values = {p: self.pcrs[p] for p in sel}
        digest = hashlib.sha256(b"".join(values[p] for p in sel)).digest()
        attest = b"".join((
            _ATTEST_HEAD, _tpm2b(self.ak_name), _tpm2b(nonce),
            struct.pack(">QIIB", self._clock(), self.reset_count, self.restart_count, 1),
            struct.pack(">Q", 0x20240125_00120000),  # firmwareVersion
            struct.pack(">IHB", 1, 0x000B, 3), bits.to_bytes(3, "little"), _tpm2b(digest),
        ))  # fmt: skip
        sig = self.ak.sign(attest, _PKCS1, _SHA256)
        return build_quote(attest, _SIG_HEAD + sig, encode_pcr_blob(BANK, values))

    def ima_tail(self, entry: int) -> tuple[str, int]:
        if entry > len(self.lines):
            entry = 0  # the verifier asks beyond the end: the whole list, as the agent does
        return "".join(self.lines[entry:]), entry

    def integrity(self, nonce: str, pcrs: list[int], partial: bool, entry: int) -> dict[str, Any]:
        return IntegrityQuote(
            self.quote(nonce.encode("ascii"), set(pcrs)), BANK, "rsa", "rsassa",
            pubkey=None if partial else self.nk_pem, boottime=BOOTTIME,
            ima=ImaTail(*self.ima_tail(entry)) if IMA_PCR in pcrs else None,
            mb=BootLog(None) if 0 in pcrs else None,  # no UEFI event log on these machines
        ).encode()  # fmt: skip

    def identity(self, nonce: str) -> dict[str, Any]:
        return IdentityQuote(self.quote(nonce.encode("ascii"), {PCR_16}), BANK, "rsa", "rsassa", self.nk_pem,
                             boottime=BOOTTIME).encode()

    def registration_body(self, mtls_cert: str, port: int) -> dict[str, Any]:
        return {"ek_tpm": base64.b64encode(self.ek_public.marshal()).decode(), "ekcert": None,
                "aik_tpm": base64.b64encode(self.ak_public.marshal()).decode(), "mtls_cert": mtls_cert,
                "ip": self.ip, "port": port}  # fmt: skip

    def activate(self, blob: bytes) -> str:
        """ActivateCredential in software -> the ``auth_tag`` for ``PUT .../activate``."""
        cred = sim_keys.activate_credential(self.ek, self.ak_name, blob)
        return credential.activation_auth_tag(cred, self.agent_id)


def self_signed(key: rsa.RSAPrivateKey) -> str:
    """The agents' shared HTTPS cert (the registered ``mtls_cert``), self-signed as the agent's."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keytrio-sim-agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _envelope(code: int, status: str, results: Any) -> bytes:
    return json.dumps({"code": code, "status": status, "results": results}).encode()


class SimAgents:
    """Many ``SimAgent``s behind one port, routed by the loopback address connected to."""

    def __init__(self, client_ca: Path, pool: sim_keys.PrimePool, policy_files: int, workdir: Path,
                 offset: int = 0, stride: int = 1) -> None:
        # fleet-wide agent indices offset, offset + stride, ...: K processes with offsets 0..K-1 and
        # stride K share out one fleet (own loopback addresses and ids; keys from this process's pool)
        self.offset, self.stride = offset, stride
        self.pool = pool
        self.policy_files = policy_files
        self.nk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.nk_pem = self.nk.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
        self.mtls_cert = self_signed(self.nk)
        workdir.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = workdir / "nk.pem", workdir / "nk-cert.pem"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.nk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        cert_file.write_text(self.mtls_cert)
        self.ssl = tls.server_context(cert_file, key_file, client_ca_files=[client_ca], mode="required")
        self.agents: list[SimAgent] = []
        self.by_ip: dict[str, SimAgent] = {}
        self.port = 0
        self.served = 0
        self.connections = 0  # accepted for an agent: > served / a few means the verifier reconnects (TLS handshakes)

    def grow(self, n: int, *, tamper: frozenset[int] = frozenset(), salt: str = "sim") -> list[SimAgent]:
        """This process's agents of fleet indices below ``n`` (local ``j``: keys = pool pairs 2j, 2j + 1)."""
        new = []
        for j in range(len(self.agents), self.local_count(n)):
            i = self.offset + j * self.stride
            files = [gen.entry_for((i * FILES_PER_AGENT + f) % self.policy_files) for f in range(FILES_PER_AGENT)]
            a = SimAgent(i, agent_uuid(i, salt), address(i), self.pool.key(2 * j), self.pool.key(2 * j + 1),
                         self.nk_pem, files, tamper=i in tamper)  # fmt: skip
            new.append(a)
            self.by_ip[a.ip] = a
        self.agents += new
        return new

    def local_count(self, n: int) -> int:
        """How many of the fleet's first ``n`` agents live in this process."""
        return max(0, -(-(n - self.offset) // self.stride))

    # --- serving -----------------------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED, port: int = 0) -> None:
        # 0.0.0.0: connections to any 127/8 address arrive here (a socket cannot bind a /8); a
        # connection to any other local address finds no agent and is closed before TLS
        listeners = await trio.open_tcp_listeners(port, host="0.0.0.0", backlog=4096)  # noqa: S104
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        agent = self.by_ip.get(tcp.socket.getsockname()[0])
        if agent is None:
            await tcp.aclose()
            return
        self.connections += 1
        stream = trio.SSLStream(tcp, self.ssl, server_side=True, https_compatible=True)
        try:
            await self._http(stream, agent)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, h11.ProtocolError):
            pass  # the verifier went away or failed the handshake: nothing to answer
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await trio.aclose_forcefully(stream)

    async def _http(self, stream: trio.SSLStream, agent: SimAgent) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                request, body = event, bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > 1 << 20:
                    return
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, payload = self.route(agent, request.method.decode(), request.target.decode("ascii"), bytes(body))
                headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers))
                                      + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                request = None

    def route(self, agent: SimAgent, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        parts = urlsplit(target)
        path = parts.path
        if path == "/version" and method == "GET":
            return 200, _envelope(200, "Success", agent_version_payload())
        version, _, route = path.lstrip("/").partition("/")
        if not version.startswith("v"):
            return 404, _envelope(404, "Not Found", {})
        q = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            if route == "quotes/integrity" and method == "GET":
                mask = q.get("mask")
                pcrs = validation.mask_to_pcrs(validation.pcr_mask(mask)) if mask is not None else []
                entry = validation.integer(q.get("ima_ml_entry", "0"), "ima_ml_entry", lo=0, hi=1 << 40)
                results = agent.integrity(validation.nonce(q.get("nonce")), pcrs, q.get("partial", "1") != "0", entry)
                self.served += 1
                return 200, _envelope(200, "Success", results)
            if route == "quotes/identity" and method == "GET":
                return 200, _envelope(200, "Success", agent.identity(validation.nonce(q.get("nonce"))))
            if route == "keys/pubkey" and method == "GET":
                return 200, _envelope(200, "Success", {"pubkey": agent.nk_pem})
            if route in ("keys/ukey", "keys/vkey") and method == "POST":
                json.loads(body)  # accepted and dropped: these machines run no payloads
                return 200, _envelope(200, "Success", {})
        except ValidationError as exc:
            return 400, _envelope(400, f"Invalid {exc.field}: {exc.reason}", {})
        except ValueError:
            return 400, _envelope(400, "Invalid JSON body", {})
        return 404, _envelope(404, "Not Found", {})

    # --- registration ------------------------------------------------------------------------

    async def register(self, agents: list[SimAgent], registrar: str, concurrency: int = 8) -> int:
        """POST + ActivateCredential (software) + PUT activate for each agent; -> how many activated."""
        done = 0
        it = iter(agents)

        async def one(client: httpx.AsyncClient, a: SimAgent) -> None:
            nonlocal done
            url = f"{registrar}/v{API}/agents/{a.agent_id}"
            r = await client.post(url, json=a.registration_body(self.mtls_cert, self.port))
            if r.status_code != 200:
                raise RuntimeError(f"registration of {a.agent_id}: {r.status_code} {r.text[:200]}")
            tag = a.activate(base64.b64decode(r.json()["results"]["blob"]))
            r = await client.put(url + "/activate", json={"auth_tag": tag})
            if r.status_code != 200:
                raise RuntimeError(f"activation of {a.agent_id}: {r.status_code} {r.text[:200]}")
            done += 1

        async def worker(client: httpx.AsyncClient) -> None:
            for a in it:
                await one(client, a)

        async with httpx.AsyncClient(timeout=60.0) as client, trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, client)
        return done


# --- the agents process (JSON lines on stdin/stdout) ----------------------------------------------------


async def process_main(client_ca: Path, policy_files: int, pool_keys: int, offset: int = 0, stride: int = 1) -> None:
    t0 = time.monotonic()
    pool = await trio.to_thread.run_sync(sim_keys.PrimePool, pool_keys)
    with tempfile.TemporaryDirectory(prefix="keytrio-sim-agents-") as tmp:
        sims = SimAgents(client_ca, pool, policy_files, Path(tmp), offset, stride)
        registered = 0  # this process's agents registered so far (the first ones)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sims.serve)
            print(json.dumps({"ready": True, "port": port, "keys": len(pool), "mtls_cert": sims.mtls_cert,
                              "seconds": time.monotonic() - t0}), flush=True)  # fmt: skip
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if not line:
                    break
                cmd = json.loads(line)
                t = time.monotonic()
                if cmd["op"] == "quit":
                    break
                if cmd["op"] == "grow":
                    local = sims.local_count(int(cmd["n"]))
                    if 2 * local > len(pool):
                        print(json.dumps({"error": f"{local} agents need {2 * local} keys; the "
                                          f"pool makes {len(pool)}"}), flush=True)  # fmt: skip
                        continue
                    sims.grow(int(cmd["n"]))
                    reg = 0
                    if cmd.get("registrar"):  # the fleet's first register_upto agents register
                        todo = sims.agents[registered:sims.local_count(int(cmd.get("register_upto", cmd["n"])))]
                        reg = await sims.register(todo, cmd["registrar"])
                        registered += reg
                    print(json.dumps({"agents": [a.describe(port, sims.mtls_cert) for a in sims.agents], "registered": reg,
                                      "mtls_cert": sims.mtls_cert, "seconds": time.monotonic() - t}), flush=True)
                elif cmd["op"] == "served":
                    print(json.dumps({"served": sims.served, "connections": sims.connections}), flush=True)
            nursery.cancel_scope.cancel()


def keys_for(agents: int) -> int:
    """Generated keys the prime pool needs for ``agents`` agents (two keys each; k(2k-1) pairs)."""
    k = 2
    while k * (2 * k - 1) < 2 * agents:
        k += 1
    return k


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) not in (4, 6):
        raise SystemExit("usage: python -m bench.sim_agent CLIENT_CA_PEM POLICY_FILES MAX_AGENTS [OFFSET STRIDE]")
    offset, stride = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) == 6 else (0, 1)
    local = max(1, -(-(int(sys.argv[3]) - offset) // stride))
    trio.run(process_main, Path(sys.argv[1]), int(sys.argv[2]), keys_for(local), offset, stride)


if __name__ == "__main__":
    main()
