"""Simulated push agents (API v3.0): bench.sim_agent's machines, but they dial in.

Each ``PushAgent`` wraps one ``sim_agent.SimAgent`` (software RSA-2048 EK/AK, PCR bank, TPM clock,
IMA log; a ``tamper`` agent sends a forged last IMA line) and runs the push agent's cycle against
the verifier's /v3 routes: ``POST /sessions`` -> ``PATCH /sessions/{id}`` with a software
TPM2_Certify of its AK (qualifyingData = the challenge, signed RSASSA/SHA-256 by the AK: the PoP),
then forever ``POST /agents/{id}/attestations`` (capabilities) -> ``PATCH .../latest`` (a quote
over exactly the PCRs chosen, ``tpm2_quote``'s PCR blob as subject_data, the IMA tail from the
offset asked for) -> sleep ``meta.seconds_to_next_attestation``. 401/403 reopen the session;
429/503 wait ``Retry-After``. Each agent keeps one TLS connection of its own (``LeanConn``,
server-verified TLS, no client cert: the bearer token is the credential); with an httpx client
instead (``push_window(lean=False)``, upstream's side) many agents share it, one keep-alive
connection per agent.

``push_window``: enrol N push agents on a verifier (the fields ``keylime_tenant -c add --push-model``
sends), run them in this process, and measure the window of bench.fleet (the verifier's utime +
stime over Σ ``attestation_count`` deltas from the bulk GET; a push attestation counts once its
evidence passed). ``push_side`` (bench.sim_fleet ``--push``) runs it against a fresh keytrio verifier
in ``mode = push`` pinned to the verifier CPU; bench.sim_push_upstream against upstream's push
verifier. ``register``: the push agent's registration (v2.x, no contact) with either registrar.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import ssl
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from bench import fleet
from bench.sim_agent import _ATTEST_HEAD, _PKCS1, _SHA256, _SIG_HEAD, BANK, BOOTTIME, SimAgent, _tpm2b
from keytrio.actors.common import tls
from keytrio.actors.common.rawconn import RawConn
from keytrio.protocol import pcr_blob, pop

JSONAPI = "application/vnd.api+json"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def push_enrolment(a: SimAgent) -> dict[str, Any]:
    """What upstream's tenant POSTs for ``add --push-model``: no address, no mTLS cert, no V."""
    return {
        "v": None, "cloudagent_ip": None, "cloudagent_port": None, "tpm_policy": fleet.TPM_POLICY,
        "runtime_policy": "", "runtime_policy_name": fleet.POLICY_NAME, "runtime_policy_key": "",
        "mb_policy": None, "mb_policy_name": None, "ima_sign_verification_keys": "", "metadata": "{}",
        "revocation_key": "", "accept_tpm_hash_algs": ["sha256", "sha384", "sha512"],
        "accept_tpm_encryption_algs": ["ecc", "rsa"], "accept_tpm_signing_algs": ["ecdsa", "rsassa"],
        "ak_tpm": _b64(a.ak_public.marshal()), "mtls_cert": None, "supported_version": "1.0",
    }  # fmt: skip


class LeanError(Exception):
    """The verifier's answer is not one LeanConn reads (no Content-Length, a bad head, cut short)."""


class LeanReply:
    """The part of an httpx.Response that PushAgent reads."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class LeanConn:
    """One push agent's kept TLS connection, as lean as the pull side's client (rawconn.RawConn).

    httpx (pool, auth, cookies, its h11 state machine) cost the bench's one controller process
    most of its 7-18 ms of CPU per attestation (docs/performance.md 4c.2), enough that at N >= 50
    its agents reached the verifier late and the row measured the client. This reads exactly what
    the verifier sends: a status line, header fields, a body of one Content-Length; anything else
    (chunked, no length, Connection: close) closes the connection after the answer or fails the
    request (LeanError), which the agent counts as an error like a transport failure. A request
    on a reused connection that gets no byte back is retried once on a new one (the verifier
    closes idle connections after its keep-alive timeout).
    """

    def __init__(self, base: str, ctx: ssl.SSLContext | None, timeout: float = 60.0) -> None:
        split = urlsplit(base)
        self.host = split.hostname or "127.0.0.1"
        self.port = split.port or (443 if split.scheme == "https" else 80)
        self.hostport = split.netloc
        self.ctx = ctx if split.scheme == "https" else None
        self.timeout = timeout
        self.conn: RawConn | None = None
        self.buf = b""

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.buf = b""
        if conn is not None:
            conn.close()

    async def request(self, method: str, path: str, body: bytes, token: str | None) -> LeanReply:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.hostport}\r\nContent-Type: {JSONAPI}\r\n"
                f"Content-Length: {len(body)}\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
        out = head.encode("latin-1") + body
        with trio.fail_after(self.timeout):
            for attempt in (0, 1):
                reused = self.conn is not None
                if self.conn is None:
                    self.conn = await RawConn.connect(self.host, self.port, self.ctx)
                    self.buf = b""
                try:
                    await self.conn.send_all(out)
                    return await self._read()
                except _NoAnswer:
                    self.close()
                    if not reused or attempt:
                        raise LeanError("connection closed before an answer") from None
                except BaseException:
                    self.close()
                    raise
        raise AssertionError("unreachable")

    async def _more(self, first: bool) -> None:
        assert self.conn is not None
        data = await self.conn.receive_some(65536)
        if not data:
            raise _NoAnswer() if first and not self.buf else LeanError("connection closed mid-answer")
        self.buf += data

    async def _read(self) -> LeanReply:
        first = True
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > 65536:
                raise LeanError("answer head too large")
            await self._more(first)
            first = False
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise LeanError(f"bad status line {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise LeanError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "")
        if not length.isdigit() or "transfer-encoding" in headers:
            raise LeanError("answer without a Content-Length")
        need = end + 4 + int(length)
        while len(self.buf) < need:
            await self._more(False)
        content, self.buf = self.buf[end + 4 : need], self.buf[need:]
        if self.buf or headers.get("connection", "").lower() == "close" or parts[0] != "HTTP/1.1":
            self.close()  # stray bytes or the server's close: not reusable
        return LeanReply(int(parts[1]), {"Retry-After": headers.get("retry-after", "1")}, content)


class _NoAnswer(Exception):
    pass


#: what a push agent's request may fail with, on either client (the run loop counts it and waits)
TRANSPORT_ERRORS = (httpx.HTTPError, LeanError, OSError, ssl.SSLError, trio.TooSlowError,
                    trio.BrokenResourceError, trio.ClosedResourceError)


class PushAgent:
    """One simulated push agent; ``client`` an httpx client shared by many agents, or an SSL
    context (None for plain HTTP) for a LeanConn of its own."""

    def __init__(self, sim: SimAgent, base: str, client: httpx.AsyncClient | ssl.SSLContext | None) -> None:
        self.sim = sim
        self.base = base.rstrip("/") + "/v3"
        self.client = client if isinstance(client, httpx.AsyncClient) else None
        self.lean = None if isinstance(client, httpx.AsyncClient) else LeanConn(base, client)
        self.path = urlsplit(self.base).path
        self.token: str | None = None
        self.sent = 0  # evidence submissions answered 202
        self.errors: dict[str, int] = {}
        self.first_error: dict[str, str] = {}  # error kind -> its first response body (diagnosis)
        #: monotonic instants for the ramp-up diagnosis: enrolled (set by push_window), each phase's
        #: first success, the first error of each kind
        self.times: dict[str, float] = {}
        #: per request kind, (answered at, seconds from sending it to its answer) of each success
        #: (201, 202), monotonic: the latency an agent sees (push_window's ``latency_ms``)
        self.answers: dict[str, list[tuple[float, float]]] = {"capabilities": [], "evidence": []}

    def _err(self, what: str, r: httpx.Response | LeanReply | None = None) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        self.times.setdefault(f"error {what}", time.monotonic())
        if r is not None:
            self.first_error.setdefault(what, r.text[:300])

    async def _req(self, method: str, path: str, body: dict[str, Any], auth: bool = True) -> httpx.Response | LeanReply:
        if self.lean is not None:
            return await self.lean.request(method, self.path + path, json.dumps(body).encode(),
                                           self.token if auth else None)
        assert self.client is not None
        headers = {"Content-Type": JSONAPI}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return await self.client.request(method, self.base + path, content=json.dumps(body), headers=headers)

    def certify(self, challenge: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify(AK by AK, qualifyingData = challenge) in software -> (attest, TPMT_SIGNATURE)."""
        name = self.sim.ak_name
        message = pop.encode_certify(extra_data=challenge, name=name, qualified_signer=name,
                                     clock=(self.sim._clock(), 1, 0, 1))  # fmt: skip
        return message, _SIG_HEAD + self.sim.ak.sign(message, _PKCS1, _SHA256)

    async def open_session(self) -> bool:
        aid = self.sim.agent_id
        r = await self._req("POST", "/sessions", {"data": {"type": "session", "attributes": {
            "agent_id": aid,
            "authentication_supported": [{"authentication_class": "pop", "authentication_type": "tpm_pop"}]}}},
            auth=False)  # fmt: skip
        if r.status_code != 200:
            self._err(f"session {r.status_code}")
            return False
        doc = r.json()["data"]
        params = doc["attributes"]["authentication_requested"][0]["chosen_parameters"]
        message, sig = self.certify(base64.b64decode(params["challenge"]))
        r = await self._req("PATCH", f"/sessions/{doc['id']}", {"data": {"type": "session", "id": doc["id"], "attributes": {
            "agent_id": aid, "authentication_provided": [{
                "authentication_class": "pop", "authentication_type": "tpm_pop",
                "data": {"message": _b64(message), "signature": _b64(sig)}}]}}}, auth=False)  # fmt: skip
        attrs = r.json().get("data", {}).get("attributes", {}) if r.status_code == 200 else {}
        if attrs.get("evaluation") != "pass":
            self._err(f"pop {r.status_code}")
            return False
        self.token = attrs["token"]
        self.times.setdefault("token", time.monotonic())
        return True

    def capabilities(self) -> dict[str, Any]:
        return {"data": {"type": "attestation", "attributes": {
            "evidence_supported": [
                {"evidence_class": "certification", "evidence_type": "tpm_quote", "capabilities": {
                    "component_version": "2.0", "hash_algorithms": [BANK], "signature_schemes": ["rsassa"],
                    "available_subjects": {BANK: list(range(24))},
                    "certification_keys": [{"key_class": "asymmetric", "key_algorithm": "rsa", "key_size": 2048,
                                            "server_identifier": "ak", "local_identifier": "att_local_identifier",
                                            "public": _b64(self.sim.ak_public.marshal())}]}},
                {"evidence_class": "log", "evidence_type": "ima_log", "capabilities": {
                    "entry_count": len(self.sim.lines), "supports_partial_access": True, "appendable": True,
                    "formats": ["text/plain"]}},
            ],
            "system_info": {"boot_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(BOOTTIME))}}}}  # fmt: skip

    def quote(self, challenge: bytes, selected: list[int]) -> dict[str, str]:
        """A TPMS_ATTEST quote over exactly ``selected`` (sha256), signed by the AK."""
        sel = sorted(set(selected))
        values = {p: self.sim.pcrs[p] for p in sel}
        bits = sum(1 << p for p in sel)
        digest = hashlib.sha256(b"".join(values[p] for p in sel)).digest()
        attest = b"".join((
            _ATTEST_HEAD, _tpm2b(self.sim.ak_name), _tpm2b(challenge),
            struct.pack(">QIIB", self.sim._clock(), self.sim.reset_count, self.sim.restart_count, 1),
            struct.pack(">Q", 0x20240125_00120000),
            struct.pack(">IHB", 1, 0x000B, 3), bits.to_bytes(3, "little"), _tpm2b(digest),
        ))  # fmt: skip
        sig = _SIG_HEAD + self.sim.ak.sign(attest, _PKCS1, _SHA256)
        return {"subject_data": _b64(pcr_blob.encode({BANK: values})), "message": _b64(attest),
                "signature": _b64(sig)}  # fmt: skip

    def evidence(self, requested: list[dict[str, Any]]) -> dict[str, Any]:
        items: list[dict[str, Any]] = []
        for want in requested:
            params = want["chosen_parameters"]
            if want["evidence_type"] == "tpm_quote":
                data = self.quote(base64.b64decode(params["challenge"]), params["selected_subjects"][BANK])
                items.append({"evidence_class": "certification", "evidence_type": "tpm_quote", "data": data})
            else:
                start = int(params.get("starting_offset", 0))
                tail = self.sim.lines[start:] if start <= len(self.sim.lines) else self.sim.lines
                items.append({"evidence_class": "log", "evidence_type": "ima_log",
                              "data": {"entry_count": len(tail), "entries": "".join(tail)}})  # fmt: skip
        return {"data": {"type": "attestation", "attributes": {"evidence_collected": items}}}

    async def cycle(self) -> float:
        """One session check + capabilities + evidence; -> seconds to wait before the next."""
        if self.token is None and not await self.open_session():
            return 2.0
        aid = self.sim.agent_id
        sent = time.monotonic()
        r = await self._req("POST", f"/agents/{aid}/attestations", self.capabilities())
        if r.status_code in (401, 403):
            self.token = None
            self._err(f"capabilities {r.status_code}", r)
            return 1.0
        if r.status_code != 201:
            self._err(f"capabilities {r.status_code}", r)
            return float(r.headers.get("Retry-After", 1))
        now = time.monotonic()
        self.answers["capabilities"].append((now, now - sent))
        self.times.setdefault("capabilities", now)
        requested = r.json()["data"]["attributes"]["evidence_requested"]
        body = self.evidence(requested)  # the quote is signed before the clock starts
        sent = time.monotonic()
        r = await self._req("PATCH", f"/agents/{aid}/attestations/latest", body)
        if r.status_code != 202:
            if r.status_code in (401, 403):
                self.token = None
            self._err(f"evidence {r.status_code}", r)
            return float(r.headers.get("Retry-After", 1))
        self.sent += 1
        now = time.monotonic()
        self.answers["evidence"].append((now, now - sent))
        self.times.setdefault("accepted", now)
        return float(r.json().get("meta", {}).get("seconds_to_next_attestation", 1))

    async def run(self, first_delay: float = 0.0) -> None:
        await trio.sleep(first_delay)
        self.times.setdefault("start", time.monotonic())
        try:
            while True:
                try:
                    wait = await self.cycle()
                except TRANSPORT_ERRORS as exc:
                    self._err(type(exc).__name__)
                    wait = 1.0
                await trio.sleep(wait)
        finally:
            if self.lean is not None:
                self.lean.close()


def push_client(ca_file: Path, n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    return httpx.AsyncClient(verify=tls.client_context([ca_file]), timeout=60.0, limits=limits)


async def _bulk(admin: httpx.AsyncClient, url: str) -> tuple[float, dict[str, Any]]:
    # the verifier may close the admin's idle keep-alive connection just as it is reused: retry once
    try:
        return await fleet._bulk(admin, url)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return await fleet._bulk(admin, url)


async def register(agents: list[SimAgent], registrar: str, concurrency: int = 8) -> int:
    """What a push agent sends its registrar (PUSH_MODEL_WIRE.md): ``POST /v2.1/agents/{id}`` with
    EK and AK and no contact (no ``mtls_cert``, ``ip``, ``port``), ActivateCredential in software,
    ``PUT .../activate``; -> how many activated. Upstream's registrar v3.0 routes answer 500, so both
    registrars are spoken to in v2.x, as upstream's push agent falls back to."""
    done = 0
    it = iter(agents)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        for a in it:
            url = f"{registrar.rstrip('/')}/v{fleet.API}/agents/{a.agent_id}"
            r = await client.post(url, json={"ek_tpm": _b64(a.ek_public.marshal()), "ekcert": None,
                                             "aik_tpm": _b64(a.ak_public.marshal())})  # fmt: skip
            if r.status_code != 200:
                raise RuntimeError(f"registration of {a.agent_id}: {r.status_code} {r.text[:200]}")
            tag = a.activate(base64.b64decode(r.json()["results"]["blob"]))
            r = await client.put(url + "/activate", json={"auth_tag": tag})
            if r.status_code != 200:
                raise RuntimeError(f"activation of {a.agent_id}: {r.status_code} {r.text[:200]}")
            done += 1

    async with httpx.AsyncClient(timeout=60.0) as client, trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, client)
    return done


def latency_ms(agents: list[PushAgent], start: float, end: float) -> dict[str, float | None]:
    """Per request kind, the median milliseconds from sending a request to its success answer
    over the requests answered within [start, end] (monotonic), all agents together."""
    out: dict[str, float | None] = {}
    for kind in ("capabilities", "evidence"):
        xs = [s for a in agents for at, s in a.answers[kind] if start <= at <= end]
        out[kind] = round(1000 * statistics.median(xs), 2) if xs else None
    return out


def ramp(agents: list[PushAgent], t0: float) -> dict[str, Any]:
    """The ramp-up, per phase: seconds from each agent's enrolment to its first success (start of
    its loop, token, capabilities 201, evidence 202) and to its first error of each kind, as
    min / median / max / count; and when (seconds from the first enrolment) the phase was reached."""
    out: dict[str, Any] = {}
    kinds = sorted({k for a in agents for k in a.times if k != "enrolled"})
    for kind in kinds:
        since = sorted(a.times[kind] - a.times["enrolled"] for a in agents if kind in a.times and "enrolled" in a.times)
        at = sorted(a.times[kind] - t0 for a in agents if kind in a.times)
        if since:
            out[kind] = {"count": len(since), "after_enrolment_s": [round(since[0], 2), round(since[len(since) // 2], 2),
                                                                    round(since[-1], 2)],
                         "since_first_enrolment_s": [round(at[0], 2), round(at[-1], 2)]}  # fmt: skip
    return out


async def start_agents(admin: httpx.AsyncClient, url: str, agents: list[PushAgent], qi: float,
                       nursery: trio.Nursery) -> None:
    """Enrol each of ``agents`` push-mode on the verifier at ``url`` and start its loop in ``nursery``."""
    rng = random.Random(0)
    for a in agents:
        r = await admin.post(f"{url}/v{fleet.API}/agents/{a.sim.agent_id}", json=push_enrolment(a.sim))
        if r.status_code != 200:
            raise RuntimeError(f"push enrolment of {a.sim.agent_id}: {r.status_code} {r.text[:300]}")
        a.times["enrolled"] = time.monotonic()
        # each agent starts within one interval of its own enrolment (its deadline,
        # maximum_attestation_interval, runs from there), spread as a fleet booted at random
        nursery.start_soon(a.run, rng.uniform(0, qi))


def agent_errors(agents: list[PushAgent]) -> tuple[dict[str, int], dict[str, str]]:
    """The agents' errors by kind, and the first answer body of each kind."""
    errors: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in agents:
        for k, v in a.errors.items():
            errors[k] = errors.get(k, 0) + v
        first = {**a.first_error, **first}
    return errors, first


async def push_window(admin: httpx.AsyncClient, url: str, ca_file: Path, pids: Callable[[], list[int]],
                      sims: list[SimAgent], qi: float, seconds: float, lean: bool = True,
                      on_window: Callable[[], None] | None = None,
                      counts: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Enrol ``sims`` push-mode on the verifier at ``url`` (its policy uploaded), run them, measure one
    window of the CPU of ``pids()`` against the evidence submissions it accepted (202) in that window,
    with the attestations that passed (Σ ``attestation_count`` deltas of the bulk GETs around it) as
    the check; -> the table row. ``on_window()`` (optional) is called as the window opens
    (bench.sim_fleet ``--py-spy-of push``); ``counts()`` (optional: the verifier's store counters,
    bench.sim_fleet ``--mixed``) is read just before and just after the window: ``store`` in the row."""
    n = len(sims)
    async with push_client(ca_file, n) as client, trio.open_nursery() as nursery:
        # lean: each agent its own LeanConn (the pull fleet's agents are as lean); httpx: the one
        # shared client of before, kept for upstream's push verifier (its answers' framing untested here)
        transport = tls.client_context([ca_file]) if lean else client
        agents = [PushAgent(s, url, transport) for s in sims]
        t0 = time.monotonic()
        await start_agents(admin, url, agents, qi, nursery)
        enrol_s = time.monotonic() - t0
        ids = [s.agent_id for s in sims]
        attested = await fleet.wait_attested(admin, url, ids, bulk=_bulk)
        await trio.sleep(math.ceil(qi))
        # the window counts evidence the verifier accepted (202) as the agents see it, read at the
        # same instants as the CPU: a bulk GET inside the window would add its own CPU, and a
        # saturated verifier (upstream's at this machine's load) answers it seconds late, which
        # would put counts and CPU on different spans. The bulk GETs just outside the window give
        # the attestations that PASSED over it (the same as accepted unless one failed: states)
        t_a, before = await _bulk(admin, url)
        store_a = await counts() if counts is not None else None
        cpu_a, ctl_a, sent_a = fleet.usage(pids())[0], sum(os.times()[:2]), sum(a.sent for a in agents)
        us_a = fleet._user_sys(pids())
        w0 = time.monotonic()
        if on_window is not None:
            on_window()
        await trio.sleep(seconds)
        cpu_b, rss = fleet.usage(pids())
        us_b, ctl_b, sent_b = fleet._user_sys(pids()), sum(os.times()[:2]), sum(a.sent for a in agents)
        wall = time.monotonic() - w0
        store_b = await counts() if counts is not None else None
        t_b, after = await _bulk(admin, url)
        nursery.cancel_scope.cancel()
    passed = sum(after.get(i, {}).get("attestation_count", 0) - before.get(i, {}).get("attestation_count", 0)
                 for i in ids)  # fmt: skip
    count = sent_b - sent_a
    states: dict[str, int] = {}
    for i in ids:
        st = str(after.get(i, {}).get("operational_state"))
        states[st] = states.get(st, 0) + 1
    errors, first = agent_errors(agents)
    rate = count / wall
    cpu_rate = (cpu_b - cpu_a) / wall
    return {
        "n": n, "mode": "push", "quote_interval": qi, "target_rate": n / math.ceil(qi), "achieved_rate": rate,
        "polls": count, "window_s": wall, "passed": passed, "passed_span_s": t_b - t_a, "cpu_s": cpu_b - cpu_a, "cpu_user_s": us_b[0] - us_a[0],
        "cpu_sys_s": us_b[1] - us_a[1], "cpu_per_poll": cpu_rate / rate if rate else None, "rss_mb": rss,
        "states": states, "agent_errors": errors, "first_errors": first, "enrol_s": enrol_s,
        "attested_at_start": attested, "evidence_sent": sent_b,
        "agents_process_cpu_per_poll": (ctl_b - ctl_a) / count if count else None,
        "agents_per_core_2s": 2.0 * rate / cpu_rate if cpu_rate else None,
        "ramp": ramp(agents, t0), "client": "lean" if lean else "httpx",
        "latency_ms": latency_ms(agents, w0, w0 + wall),
        "store": fleet.store_delta(store_a, store_b),
    }  # fmt: skip


async def push_side(admin: httpx.AsyncClient, ca: Path, data_dir: Path, cpu: int, log: Any, sims: list[SimAgent],
                    body: dict[str, Any], qi: float, seconds: float, lean: bool = True,
                    on_window: Callable[[int], None] | None = None, metrics_port: int | None = None) -> dict[str, Any]:
    """One window of N push agents against a fresh keytrio verifier in push mode (see the module doc);
    ``on_window(pid)`` (optional): called with the verifier's pid as the window opens; ``metrics_port``
    (optional): the verifier serves /metrics there and the row has its store counts (``store``)."""
    options: dict[str, Any] = {"quote_interval": qi, "mode": "push"}
    if metrics_port is not None:
        options.update(metrics_ip="127.0.0.1", metrics_port=metrics_port)
    srv, url = fleet._start_keytrio(ca, data_dir, cpu, log, options=options)
    try:
        await fleet._upload(admin, url, body)
        return await push_window(admin, url, ca / "cacert.crt", lambda: [srv.pid], sims, qi, seconds, lean,
                                 on_window=(lambda: on_window(srv.pid)) if on_window is not None else None,
                                 counts=(lambda: fleet.store_counts(metrics_port)) if metrics_port else None)
    finally:
        fleet.stop_child(srv)
