"""A local HTTPS verifier that answers the agent's push calls as upstream 7.14.3 does (no test).

Real TLS socket, real JSON:API documents, and real checks of what the agent sends: the PoP proof
(TPM2_Certify of the AK over the challenge, signature by the AK) and each quote (challenge in
extraData, the PCRs requested, pcrDigest over the tpm2-tools PCR blob, signature by the AK).
It keeps upstream's shapes (shared/PUSH_MODEL_WIRE.md): session 200 with a challenge, PATCH 200
with ``evaluation`` pass + token (or fail, no token, while not enrolled), attestation 201 without
``data.id`` but with ``Location``, evidence 202 with ``meta.seconds_to_next_attestation``, 401
for an unknown token, and a script of answers to put first (429/503 with ``Retry-After``).

``stop()`` closes the port (connections are refused) and ``start()`` opens it again on the same
port with fresh state, as a restarted verifier that forgot its sessions.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from quart import request
from quart_trio import QuartTrio
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.types import TPMS_ATTEST, TPMT_SIGNATURE

from keytrio.actors.agent.tpm import public_key
from keytrio.actors.common import tls
from keytrio.actors.common.serve import serve
from keytrio.protocol import pcr_blob

EPOCH = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)


def stamp(seconds: float) -> str:
    return (EPOCH + datetime.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


@dataclass
class Seen:
    """One request as it arrived: mock time, method, path, bearer token, JSON body."""

    at: float
    method: str
    path: str
    token: str | None
    body: Any
    status: int = 0


@dataclass
class PushVerifier:
    cert: Path
    key: Path
    agent_id: str
    ak_public: bytes | None  # None until enrolled: every proof then answers evaluation fail
    interval: float = 7.0  # seconds_to_next_attestation
    token_lifetime: float = 180.0
    enrolled: bool = True
    want_uefi: bool = False  # ask for the UEFI log too (upstream does when a measured-boot policy is enrolled)
    seen: list[Seen] = field(default_factory=list)
    script: deque[tuple[str, int, float]] = field(default_factory=deque)  # (route, status, Retry-After)
    port: int = 0
    capabilities_seen: list[list[dict[str, Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what the checks refused (a test asserts it stays empty)
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    # state a restart forgets
    _sessions: dict[str, bytes] = field(default_factory=dict)
    _tokens: dict[str, float] = field(default_factory=dict)  # token -> expires at (mock time)
    _attestations: list[dict[str, Any]] = field(default_factory=list)
    _certified_lines: int = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        self._sessions, self._tokens, self._attestations = {}, {}, []
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        ctx = tls.server_context(self.cert, self.key, mode="none")
        scope, stopped = trio.CancelScope(), trio.Event()
        self._scope, self._stopped = scope, stopped

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    # idle connections outlive every test: the agent's pool never races a server-side close
                    await serve(self._app(), listeners=listeners, ssl_context=ctx, keep_alive_timeout=1e6,
                                task_status=task_status)
            finally:
                stopped.set()

        await nursery.start(run)

    async def stop(self) -> None:
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def wait_for(self, count: int, method: str, suffix: str) -> list[Seen]:
        """The first ``count`` requests ``method`` ... ``suffix`` (waits for them)."""
        with trio.fail_after(3600):  # mock seconds: a hang guard only
            while len(got := self.calls(method, suffix)) < count:
                self._changed = trio.Event()
                await self._changed.wait()
        return got[:count]

    def calls(self, method: str, suffix: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.endswith(suffix)]

    # -- the app --------------------------------------------------------------------------------

    def _app(self) -> QuartTrio:
        app = QuartTrio("push-verifier")
        route = functools.partial(app.route, methods=["POST", "PATCH"])

        @route("/v3/sessions")
        async def create_session() -> Any:
            return await self._answer("session", self._session)

        @route("/v3/sessions/<sid>")
        async def prove(sid: str) -> Any:
            return await self._answer("proof", lambda body: self._proof(sid, body))

        @route("/v3/agents/<agent>/attestations")
        async def capabilities(agent: str) -> Any:
            return await self._answer("capabilities", self._capabilities, authed=True)

        @route("/v3/agents/<agent>/attestations/<index>")
        async def evidence(agent: str, index: str) -> Any:
            return await self._answer("evidence", lambda body: self._evidence(index, body), authed=True)

        return app

    async def _answer(self, name: str, handler: Any, *, authed: bool = False) -> Any:
        body = await request.get_json(force=True, silent=True)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        seen = Seen(trio.current_time(), request.method, request.path, token, body)
        self.seen.append(seen)
        self._changed.set()
        if self.script and self.script[0][0] == name:
            _, status, retry_after = self.script.popleft()
            seen.status = status
            code = {429: "premature_attestation", 503: "verification_in_progress"}.get(status, "error")
            return {"errors": [{"status": str(status), "code": code}]}, status, {"Retry-After": str(int(retry_after))}
        if authed:
            if request.headers.get("Content-Type") != "application/vnd.api+json":
                self.problems.append(f"{name}: Content-Type {request.headers.get('Content-Type')!r}")
                return {"errors": [{"status": "400"}]}, 400
            if token is None:
                seen.status = 403
                return {"errors": [{"detail": "Action submit_attestation requires agent authentication (PoP token)"}]}, 403
            if self._tokens.get(token, -1.0) < trio.current_time():
                seen.status = 401
                return {"errors": [{"detail": "Invalid authentication token"}]}, 401
        doc, status, headers = handler(body)
        seen.status = status
        return doc, status, headers

    def _session(self, body: Any) -> tuple[Any, int, dict[str, str]]:
        attrs = body["data"]["attributes"]
        assert attrs["agent_id"] == self.agent_id, attrs
        sid, challenge = os.urandom(8).hex(), os.urandom(16)
        self._sessions[sid] = challenge
        now = trio.current_time()
        return {"data": {"type": "session", "id": sid, "attributes": {
            "agent_id": self.agent_id,
            "authentication_requested": [{"authentication_class": "pop", "authentication_type": "tpm_pop",
                                          "chosen_parameters": {"challenge": base64.b64encode(challenge).decode()}}],
            "created_at": stamp(now), "challenges_expire_at": stamp(now + 60)}}}, 200, {}

    def _verify_signature(self, attest: bytes, signature: bytes) -> bool:
        assert self.ak_public is not None
        sig, _ = TPMT_SIGNATURE.unmarshal(signature)
        try:
            public_key(self.ak_public).verify(bytes(sig.signature.rsassa.sig), attest, padding.PKCS1v15(),
                                              hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    def _proof(self, sid: str, body: Any) -> tuple[Any, int, dict[str, str]]:
        challenge = self._sessions.pop(sid, None)
        if challenge is None:
            return {"errors": [{"status": "404"}]}, 404, {}
        data = body["data"]["attributes"]["authentication_provided"][0]["data"]
        attest, signature = base64.b64decode(data["message"]), base64.b64decode(data["signature"])
        now = trio.current_time()
        attrs: dict[str, Any] = {"agent_id": self.agent_id, "created_at": stamp(now)}
        if not self.enrolled or self.ak_public is None:
            return {"data": {"type": "session", "id": sid, "attributes": {**attrs, "evaluation": "fail"}}}, 200, {}
        info, _ = TPMS_ATTEST.unmarshal(attest)
        ak_name = b"\x00\x0b" + hashlib.sha256(self.ak_public[2:]).digest()  # TPMT_PUBLIC inside TPM2B_PUBLIC
        ok = (info.type == TPM2_ST.ATTEST_CERTIFY and bytes(info.extraData) == challenge
              and bytes(info.attested.certify.name) == ak_name and self._verify_signature(attest, signature))
        if not ok:
            self.problems.append("proof refused")
            return {"data": {"type": "session", "id": sid, "attributes": {**attrs, "evaluation": "fail"}}}, 401, {}
        token = f"{sid}.{os.urandom(16).hex()}"
        self._tokens[token] = now + self.token_lifetime
        return {"data": {"type": "session", "id": sid, "attributes": {
            **attrs, "evaluation": "pass", "token": token, "response_received_at": stamp(now),
            "token_expires_at": stamp(now + self.token_lifetime)}}}, 200, {}

    def _capabilities(self, body: Any) -> tuple[Any, int, dict[str, str]]:
        supported = body["data"]["attributes"]["evidence_supported"]
        self.capabilities_seen.append(supported)
        assert body["data"]["attributes"]["system_info"]["boot_time"]
        quote = next(s for s in supported if s["evidence_type"] == "tpm_quote")["capabilities"]
        assert quote["available_subjects"] == {"sha256": list(range(24))}, quote
        ima = next(s for s in supported if s["evidence_type"] == "ima_log")["capabilities"]
        index = len(self._attestations)
        challenge = os.urandom(16)
        self._attestations.append({"challenge": challenge, "offset": self._certified_lines,
                                   "entry_count": ima["entry_count"], "done": False})
        now = trio.current_time()
        path = f"/v3/agents/{self.agent_id}/attestations/{index}"
        return {"data": {"type": "attestation", "attributes": {
            "stage": "awaiting_evidence",
            "evidence_requested": [
                {"evidence_class": "certification", "evidence_type": "tpm_quote", "chosen_parameters": {
                    "challenge": base64.b64encode(challenge).decode(), "signature_scheme": "rsassa",
                    "hash_algorithm": "sha256", "selected_subjects": {"sha256": [10]},
                    "certification_key": {"key_class": "asymmetric", "key_algorithm": "rsa", "key_size": 2048,
                                          "server_identifier": "ak"}}},
                {"evidence_class": "log", "evidence_type": "ima_log",
                 "chosen_parameters": {"starting_offset": self._certified_lines, "format": "text/plain"}},
                *([{"evidence_class": "log", "evidence_type": "uefi_log",
                    "chosen_parameters": {"format": "application/octet-stream"}}] if self.want_uefi else []),
            ],
            "capabilities_received_at": stamp(now), "challenges_expire_at": stamp(now + 1800)},
            "links": {"self": path}}, "jsonapi": {"version": "1.1"}}, 201, {"Location": path}

    def _evidence(self, index: str, body: Any) -> tuple[Any, int, dict[str, str]]:
        if not index.isdigit() or int(index) != len(self._attestations) - 1:
            return {"errors": [{"status": "403", "code": "old_attestation"}]}, 403, {}
        att = self._attestations[int(index)]
        if att["done"]:
            return {"errors": [{"status": "403", "code": "evidence_immutable"}]}, 403, {}
        att["done"] = True
        quote, ima, *uefi = body["data"]["attributes"]["evidence_collected"]
        if self.want_uefi:
            uefi_caps = next(s for s in self.capabilities_seen[-1] if s["evidence_type"] == "uefi_log")["capabilities"]
            att["uefi"] = base64.b64decode(uefi[0]["data"]["entries"])
            if uefi[0]["evidence_type"] != "uefi_log" or len(att["uefi"]) != uefi_caps["entry_count"]:
                self.problems.append(f"UEFI log of attestation {index}: {uefi}")
        data = quote["data"]
        attest, signature = base64.b64decode(data["message"]), base64.b64decode(data["signature"])
        bank, pcrs = pcr_blob.decode_single(base64.b64decode(data["subject_data"]))
        info, _ = TPMS_ATTEST.unmarshal(attest)
        selected = info.attested.quote.pcrSelect
        if not (info.type == TPM2_ST.ATTEST_QUOTE and bytes(info.extraData) == att["challenge"]
                and bank == "sha256" and sorted(pcrs) == [10] and len(selected) == 1
                and bytes(info.attested.quote.pcrDigest) == hashlib.sha256(pcrs[10]).digest()
                and self._verify_signature(attest, signature)):
            self.problems.append(f"quote of attestation {index} refused")
        lines = ima["data"]["entries"]
        if ima["data"]["entry_count"] != lines.count("\n") or lines.count("\n") < att["entry_count"] - att["offset"]:
            self.problems.append(f"IMA lines of attestation {index}: {ima['data']}")
        self._certified_lines = att["offset"] + lines.count("\n")
        att["lines"] = lines
        now = trio.current_time()
        for token in self._tokens:  # upstream extends the token on every attestation (extend_token_on_attestation)
            self._tokens[token] = max(self._tokens[token], now + self.token_lifetime)
        return {"data": {"type": "attestation", "attributes": {"stage": "evaluating_evidence",
                                                               "evidence_received_at": stamp(now)},
                         "links": {"self": f"/3/agents/{self.agent_id}/attestations/{index}"}},
                "meta": {"seconds_to_next_attestation": self.interval}}, 202, {}

    @property
    def attestations(self) -> list[dict[str, Any]]:
        return self._attestations

