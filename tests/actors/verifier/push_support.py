"""A software push agent for the verifier's v3.0 tests: real HTTPS (server verification only, no
client cert), a software AK (tests.protocol.tpm2_support's keys, TPM2B_PUBLIC like tpm2_createak),
TPM2_Certify and TPM2_Quote structures built and signed in software (real crypto), and an ima-ng
list whose lines are really extended into its PCR 10.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio
from trio.testing import MockClock

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier.schema import push_attestations, push_sessions
from keytrio.protocol import ima, pcr_blob
from tests.actors.verifier_support import RunningVerifier, start_verifier
from tests.protocol.quote_support import make_attest, make_pop, sign_attest
from tests.protocol.tpm2_support import ak_public

BANK = "sha256"
JSONAPI = "application/vnd.api+json"


def entry(path: str, content: bytes | None = None) -> ima.Entry:
    return ima.build_entry("ima-ng", path, "sha256", hashlib.sha256(content or path.encode()).digest())


def policy_for(paths: list[str]) -> dict[str, Any]:
    """A runtime policy (upstream's JSON format) allowing each path with its default content."""
    return {
        "meta": {"version": 1, "generator": 3}, "release": 0,
        "digests": {p: [entry(p).digest.hex()] for p in paths},
        "excludes": [], "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {}, "verification-keys": "",
    }


def push_enrol_body(kind: str, policy: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    """What upstream's tenant POSTs for ``add --push-model`` (ip/port/mtls_cert/v null)."""
    body = {
        "v": None, "cloudagent_ip": None, "cloudagent_port": None,
        "verifier_ip": "127.0.0.1", "verifier_port": 8881,
        "tpm_policy": json.dumps({"mask": "0x0"}),
        "runtime_policy": base64.b64encode(json.dumps(policy).encode()).decode() if policy else "",
        "runtime_policy_name": "", "runtime_policy_key": "",
        "mb_policy": None, "mb_policy_name": "", "ima_sign_verification_keys": "",
        "metadata": "{}", "revocation_key": "",
        "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
        "accept_tpm_encryption_algs": ["ecc", "rsa"],
        "accept_tpm_signing_algs": ["ecschnorr", "rsassa"],
        "ak_tpm": base64.b64encode(ak_public(kind).marshal()).decode(),
        "mtls_cert": None, "supported_version": "1.0",
    }
    body.update(over)
    return body


@dataclass
class SoftAgent:
    agent_id: str
    kind: str  # the test key of its AK ("rsa", "rsa2")
    base: str  # https://host:port
    client: httpx.AsyncClient
    entries: list[ima.Entry] = field(default_factory=list)
    token: str | None = None
    tpm_clock: int = 10_000
    prefix: str = "/v3"

    @classmethod
    def make(cls, agent_id: str, kind: str, host: str, port: int, ca: Any, paths: list[str]) -> SoftAgent:
        client = make_client(tls.client_context([ca]), timeout=20.0)
        return cls(agent_id, kind, f"https://{host}:{port}", client, [entry(p) for p in paths])

    def headers(self, token: str | None = None) -> dict[str, str]:
        h = {"Content-Type": JSONAPI}
        tok = token if token is not None else self.token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        return h

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else (json.dumps(body) if body is not None else None)
        return await self.client.request(method, self.base + self.prefix + path, content=content,
                                         headers=headers if headers is not None else self.headers(token))

    # --- session ------------------------------------------------------------------------------

    async def open_session(self, signer: str | None = None) -> httpx.Response:
        resp = await self.request("POST", "/sessions", {"data": {"type": "session", "attributes": {
            "agent_id": self.agent_id,
            "authentication_supported": [{"authentication_class": "pop", "authentication_type": "tpm_pop"}]}}},
            token="")
        assert resp.status_code == 200, resp.text
        doc = resp.json()["data"]
        challenge = base64.b64decode(doc["attributes"]["authentication_requested"][0]["chosen_parameters"]
                                     ["challenge"])
        message, signature = make_pop(challenge, signer or self.kind)
        resp = await self.request("PATCH", f"/sessions/{doc['id']}", {"data": {
            "type": "session", "id": doc["id"], "attributes": {
                "agent_id": self.agent_id,
                "authentication_provided": [{"authentication_class": "pop", "authentication_type": "tpm_pop",
                                             "data": {"message": base64.b64encode(message).decode(),
                                                      "signature": base64.b64encode(signature).decode()}}]}}},
            token="")
        if resp.status_code == 200 and resp.json()["data"]["attributes"]["evaluation"] == "pass":
            self.token = resp.json()["data"]["attributes"]["token"]
        return resp

    # --- attestation --------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return {"data": {"type": "attestation", "attributes": {
            "evidence_supported": [
                {"evidence_class": "certification", "evidence_type": "tpm_quote", "capabilities": {
                    "component_version": "2.0", "hash_algorithms": ["sha256"], "signature_schemes": ["rsassa"],
                    "available_subjects": {"sha256": list(range(24))},
                    "certification_keys": [{"key_class": "asymmetric", "key_algorithm": "rsa", "key_size": 2048,
                                            "server_identifier": "ak", "local_identifier": "att_local_identifier",
                                            "public": base64.b64encode(ak_public(self.kind).marshal()).decode()}]}},
                {"evidence_class": "log", "evidence_type": "ima_log", "capabilities": {
                    "entry_count": len(self.entries), "supports_partial_access": True, "appendable": True,
                    "formats": ["text/plain"]}},
            ],
            "system_info": {"boot_time": "2026-12-03T10:00:00Z"}}}}

    async def post_capabilities(self, **kw: Any) -> httpx.Response:
        return await self.request("POST", f"/agents/{self.agent_id}/attestations", self.capabilities(), **kw)

    def pcrs(self, selected: list[int]) -> dict[int, bytes]:
        values = {p: hashlib.sha256(b"pcr%d" % p).digest() for p in selected}
        if 10 in values:
            values[10] = ima.replay(self.entries, BANK)
        return values

    def evidence(self, requested: list[dict[str, Any]], *, forge: bool = False,
                 lines: list[str] | None = None, as_object: bool = False) -> dict[str, Any]:
        """evidence_collected for ``requested`` (a quote over the chosen PCRs with the challenge)."""
        items: list[dict[str, Any]] = []
        for want in requested:
            params = want["chosen_parameters"]
            if want["evidence_type"] == "tpm_quote":
                challenge = base64.b64decode(params["challenge"])
                values = self.pcrs(params["selected_subjects"][BANK])
                self.tpm_clock += 1000
                attest = make_attest(nonce=challenge, bank=BANK, pcrs=values, clock=(self.tpm_clock, 1, 0, 1))
                sig = bytearray(sign_attest(attest, self.kind, BANK))
                if forge:
                    sig[-1] ^= 1
                subject: Any = base64.b64encode(pcr_blob.encode({BANK: values})).decode()
                if as_object:
                    subject = {str(p): v.hex() for p, v in values.items()}
                items.append({"evidence_class": "certification", "evidence_type": "tpm_quote", "data": {
                    "subject_data": subject, "message": base64.b64encode(attest).decode(),
                    "signature": base64.b64encode(bytes(sig)).decode()}})
            else:
                tail = lines if lines is not None else [ima.format_line(e) for e in
                                                        self.entries[params["starting_offset"]:]]
                items.append({"evidence_class": "log", "evidence_type": "ima_log", "data": {
                    "entry_count": len(tail), "entries": "".join(x + "\n" for x in tail)}})
        return {"data": {"type": "attestation", "attributes": {"evidence_collected": items}}}

    async def send_evidence(self, body: dict[str, Any], which: str = "latest", **kw: Any) -> httpx.Response:
        return await self.request("PATCH", f"/agents/{self.agent_id}/attestations/{which}", body, **kw)

    async def cycle(self, **evidence_kw: Any) -> tuple[int, httpx.Response]:
        """capabilities -> evidence; (index, the PATCH response)."""
        resp = await self.post_capabilities()
        assert resp.status_code == 201, resp.text
        index = int(resp.headers["Location"].rsplit("/", 1)[1])
        requested = resp.json()["data"]["attributes"]["evidence_requested"]
        return index, await self.send_evidence(self.evidence(requested, **evidence_kw))


# --- a push verifier and its agents (time on the test's MockClock, the `clock` fixture) -----------

A = "a0000000-0000-4000-8000-00000000000a"
B = "b0000000-0000-4000-8000-00000000000b"
PATHS = ["/usr/bin/ls", "/usr/bin/cat", "/usr/lib/libc.so.6"]
GUARD = 60  # mock seconds: a hang guard only


async def start(nursery: trio.Nursery, tmp: Path, pki: Any, clock: MockClock, **over: Any) -> RunningVerifier:
    opts: dict[str, Any] = {"mode": "push", "quote_interval": 2.0}
    opts.update(over)
    return await start_verifier(nursery, pki, tmp / "verifier", clock=clock.current_time, **opts)


def agent(rv: RunningVerifier, pki: Any, agent_id: str = A, kind: str = "rsa", paths: list[str] = PATHS) -> SoftAgent:
    host, port = rv.verifier.address  # type: ignore[misc]
    return SoftAgent.make(agent_id, kind, host, port, pki.ca, paths)


async def enrolled(rv: RunningVerifier, pki: Any, agent_id: str = A, kind: str = "rsa") -> SoftAgent:
    await rv.call("POST", f"/agents/{agent_id}", push_enrol_body(kind, policy_for(PATHS)))
    a = agent(rv, pki, agent_id, kind)
    resp = await a.open_session()
    assert resp.status_code == 200 and a.token, resp.text
    return a


async def verdict(rv: RunningVerifier, agent_id: str, index: int) -> dict[str, Any]:
    """Poll the admin GET until the attestation's verification completed."""
    with trio.fail_after(GUARD):
        while True:
            resp = await rv.admin.get(rv.url.replace("/v2.1", "/v3") + f"/agents/{agent_id}/attestations/{index}")
            assert resp.status_code == 200, resp.text
            attrs = resp.json()["data"]["attributes"]
            if attrs["stage"] == "verification_complete":
                return resp.json()["data"]
            await trio.sleep(0.2)


async def wait_next(clock: MockClock, resp: Any) -> None:
    await trio.sleep(resp.json()["meta"]["seconds_to_next_attestation"])


async def rows(rv: Any) -> tuple[int, int]:
    """How many push sessions and attestations the verifier's database holds."""
    def q(conn: sa.Connection) -> tuple[int, int]:
        return (conn.execute(sa.select(sa.func.count()).select_from(push_sessions)).scalar_one(),
                conn.execute(sa.select(sa.func.count()).select_from(push_attestations)).scalar_one())

    return await rv.verifier.store.read(q)
