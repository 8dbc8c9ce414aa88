"""The push cycle's floor: a minimal v3.0 push verifier, to measure what the protocol itself costs.

    python -m bench.floor_push CA_DIR [INTERVAL [bare]]   # prints ``PORT <n>``; runs until SIGTERM/SIGINT

Not a verifier: a measuring instrument for issue 19 item 7 (docs/performance.md 4c.15). It answers
exactly what bench.sim_push's agents and bench.fleet's admin client send, and per push attestation
it does only what any push verifier must do on this wire, in the fewest Python steps we know:

- two HTTPS exchanges on a kept connection (serve.py's TLS transport, ``TLSServerStream``), each a
  request head read by one split, one ``json.loads`` and one ``json.dumps`` of the answer;
- the bearer token's SHA-256 looked up in a dict (tokens stored hashed, as the verifier does);
- capabilities: the IMA log's entry count read, a fresh challenge, the 201 with what is requested;
- evidence: three base64 decodes, TPMS_ATTEST and TPMT_SIGNATURE decoded (protocol.quote), the
  challenge compared, the PCR blob decoded (protocol.pcr_blob), the selected PCRs' digest compared
  with the quote's, one RSA verify, the TPM clock compared with the last, new IMA lines (none in a
  steady fleet) checked against the policy and replayed, PCR 10 compared; the 202 with the
  evidence echoed as the verifier answers it;
- two rows per attestation (its challenge, its verdict) to SQLite, batched: a background task
  commits what came in the last 100 ms in one ``executemany`` in a worker thread.

What it leaves out makes it a lower bound of a correct implementation, not a rival: answers do
not wait for the store (the challenge and the evidence live in memory until the batch commits:
lost by a crash), no attestation history, no 429/503 rules, no timers for silent agents, no
revocation notices, no input validation beyond what the floor needs to stay correct on good
input, no metrics. A request it does not answer gets a 4xx and the connection closed.

``bare`` goes further, to the wire alone: no store rows at all, and each answer only what the agent
reads (the 201's ``evidence_requested``, the 202's evaluation and ``seconds_to_next_attestation``).

Admin routes (mTLS client certificate required, as on the verifier): ``POST /v2.x/allowlists/N``
(the runtime policy), ``POST /v2.x/agents/ID`` (push enrolment: ``ak_tpm``), ``GET
/v2.x/agents/?bulk`` (``attestation_count`` and ``operational_state`` per agent). Session routes:
``POST /v3/sessions``, ``PATCH /v3/sessions/ID`` (the PoP: protocol.pop.verify_pop).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import floor_serve
from bench.floor_serve import Answer, Refused, Seen
from keytrio.protocol import pop, tpm2

_B64 = base64.b64decode


@dataclass
class Agent:
    agent_id: str
    ak: tpm2.AkKey
    seen: Seen = field(default_factory=Seen)
    pcrs: tuple[int, ...] = (10,)
    challenge: bytes | None = None
    index: int = 0
    session_challenge: bytes | None = None


class Floor(floor_serve.Admin):
    def __init__(self, db_path: Path, interval: int, bare: bool = False) -> None:
        super().__init__()
        self.bare = bare  # no store rows, no evidence echoed, the least JSON the agent reads
        self.interval = interval  # seconds_to_next_attestation, as the verifier's retry_after(quote_interval)
        self.tokens: dict[bytes, str] = {}  # SHA-256 of a bearer token -> agent id
        self.sessions: dict[str, str] = {}  # session id -> agent id
        self.rows = floor_serve.Rows(db_path)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes, client_cert: bool) -> Answer:
        if path.startswith("/v3"):
            parts = path.split("/")  # ["", "v3", "agents", ID, "attestations", ...]
            if len(parts) >= 5 and parts[2] == "agents" and parts[4] == "attestations":
                agent = self._admit(headers, parts[3])
                doc = json.loads(body)
                if method == "POST" and len(parts) == 5:
                    return self._capabilities(agent, doc, parts[1])
                if method == "PATCH" and len(parts) == 6:
                    return self._evidence(agent, doc, parts[1])
            if len(parts) >= 3 and parts[2] == "sessions":
                return self._session(method, parts, json.loads(body))
            raise Refused(f"no route {method} {path}", 404)
        return self.admin(method, path, body, client_cert)

    def enrol(self, agent_id: str, doc: dict[str, Any]) -> Agent:
        return Agent(agent_id, tpm2.ak_key(_B64(doc["ak_tpm"])))

    def _admit(self, headers: dict[str, str], agent_id: str) -> Agent:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or self.tokens.get(hashlib.sha256(auth[7:].encode()).digest()) != agent_id:
            raise Refused("bad token", 401)
        agent = self.agents[agent_id]
        if agent.seen.failed is not None:
            raise Refused(f"failed: {agent.seen.failed}", 403)
        return agent

    def _capabilities(self, agent: Agent, doc: Any, prefix: str) -> Answer:
        offset = agent.seen.next_line
        for item in doc["data"]["attributes"]["evidence_supported"]:
            if item["evidence_type"] == "ima_log" and item["capabilities"]["entry_count"] < offset:
                offset, agent.seen = 0, Seen(count=agent.seen.count)  # a new boot
        challenge = os.urandom(20)
        agent.challenge = challenge
        agent.index += 1
        now = time.time()
        requested = [
            {"evidence_class": "certification", "evidence_type": "tpm_quote", "chosen_parameters": {
                "challenge": base64.b64encode(challenge).decode(), "signature_scheme": "rsassa",
                "hash_algorithm": "sha256", "selected_subjects": {"sha256": list(agent.pcrs)},
                "certification_key": {"key_class": "asymmetric", "key_algorithm": "rsa", "key_size": 2048,
                                      "server_identifier": "ak"}}},
            {"evidence_class": "log", "evidence_type": "ima_log",
             "chosen_parameters": {"starting_offset": offset, "format": "text/plain"}},
        ]  # fmt: skip
        if self.bare:
            out = json.dumps({"data": {"type": "attestation", "id": str(agent.index), "attributes": {
                "stage": "awaiting_evidence", "evidence_requested": requested}}}).encode()
            return 201, out, ""
        self.rows.pending.append((agent.agent_id, agent.index, "pending", now))
        out = self._resource(agent, prefix, "awaiting_evidence", "pending", now,
                             {"evidence_requested": requested, "evidence": []})
        return 201, out, f"location: {prefix}/agents/{agent.agent_id}/attestations/{agent.index}\r\n"

    def _evidence(self, agent: Agent, doc: Any, prefix: str) -> Answer:
        challenge, agent.challenge = agent.challenge, None
        if challenge is None:
            raise Refused("no attestation awaits evidence", 403)
        items = doc["data"]["attributes"]["evidence_collected"]
        quote, log = items[0]["data"], items[1]["data"]
        seen = agent.seen
        failure, values, clock = floor_serve.check_quote(
            agent.ak, _B64(quote["message"]), _B64(quote["signature"]), _B64(quote["subject_data"]), challenge,
            agent.pcrs, seen)  # fmt: skip
        if failure is None:
            failure = floor_serve.check_ima(seen, log["entries"], seen.next_line, values[10], self.policy)
        now = time.time()
        if failure is None:
            seen.count += 1
            seen.clock = clock
            evaluation = "pass"
        else:
            seen.failed = failure
            evaluation = "fail"
        if self.bare:
            out = json.dumps({"data": {"type": "attestation", "id": str(agent.index), "attributes": {
                "stage": "verification_complete", "evaluation": evaluation}},
                "meta": {"seconds_to_next_attestation": self.interval}}).encode()  # fmt: skip
            return 202, out, ""
        self.rows.pending.append((agent.agent_id, agent.index, evaluation, now))
        out = self._resource(agent, prefix, "verification_complete", evaluation, now,
                             {"evidence": items}, meta={"seconds_to_next_attestation": self.interval})
        return 202, out, f"location: {prefix}/agents/{agent.agent_id}/attestations/{agent.index}\r\n"

    @staticmethod
    def _resource(agent: Agent, prefix: str, stage: str, evaluation: str, now: float, extra: dict[str, Any],
                  meta: dict[str, Any] | None = None) -> bytes:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        doc: dict[str, Any] = {"data": {"type": "attestation", "id": str(agent.index), "attributes": {
            "stage": stage, "evaluation": evaluation, "failure_reason": agent.seen.failed, **extra,
            "system_info": {}, "capabilities_received_at": stamp, "challenges_expire_at": stamp,
            "evidence_received_at": stamp, "verification_completed_at": stamp},
            "links": {"self": f"{prefix}/agents/{agent.agent_id}/attestations/{agent.index}"}}}  # fmt: skip
        if meta is not None:
            doc["meta"] = meta
        doc["jsonapi"] = {"version": "1.1"}
        return json.dumps(doc).encode()

    def _session(self, method: str, parts: list[str], doc: Any) -> Answer:
        attrs = doc["data"]["attributes"]
        agent = self.agents.get(attrs["agent_id"])
        if agent is None:
            raise Refused("unknown agent", 404)
        if method == "POST" and len(parts) == 3:
            sid = secrets.token_hex(8)
            self.sessions[sid] = agent.agent_id
            agent.session_challenge = os.urandom(32)
            out = {"data": {"type": "session", "id": sid, "attributes": {
                "agent_id": agent.agent_id, "authentication_requested": [{
                    "authentication_class": "pop", "authentication_type": "tpm_pop",
                    "chosen_parameters": {"challenge": base64.b64encode(agent.session_challenge).decode()}}]}}}
            return 200, json.dumps(out).encode(), ""  # fmt: skip
        if method == "PATCH" and len(parts) == 4 and self.sessions.get(parts[3]) == agent.agent_id:
            proof = attrs["authentication_provided"][0]["data"]
            try:
                pop.verify_pop(_B64(proof["message"]), _B64(proof["signature"]), ak_public=agent.ak,
                               challenge=agent.session_challenge or b"")
            except pop.PopError as exc:
                raise Refused(f"proof of possession: {exc}", 401) from None
            token = secrets.token_urlsafe(32)
            self.tokens[hashlib.sha256(token.encode()).digest()] = agent.agent_id
            out = {"data": {"type": "session", "id": parts[3], "attributes": {
                "agent_id": agent.agent_id, "evaluation": "pass", "token": token}}}
            return 200, json.dumps(out).encode(), ""
        raise Refused("bad session request")


async def floor_side(admin: httpx.AsyncClient, ca: Path, cpu: int, log: Any, sims: list[Any], body: dict[str, Any],
                     qi: float, seconds: float, bare: bool = False) -> dict[str, Any]:
    """One window of the push agents ``sims`` against a fresh floor server: bench.sim_push's row."""
    from bench import fleet, sim_push

    args = [str(ca), str(max(1, math.ceil(qi))), *(["bare"] if bare else [])]
    srv, url = floor_serve.start("bench.floor_push", args, cpu, log)
    try:
        await fleet._upload(admin, url, body)
        return await sim_push.push_window(admin, url, ca / "cacert.crt", lambda: [srv.pid], sims, qi, seconds)
    finally:
        fleet.stop_child(srv)


def main() -> None:
    interval = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    trio.run(floor_serve.serve, Path(sys.argv[1]),
             lambda tmp, _nursery: Floor(tmp / "floor.sqlite", interval, sys.argv[3:] == ["bare"]))


if __name__ == "__main__":
    main()
