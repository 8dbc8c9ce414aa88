"""The add flow (upstream tenant ``-c add``), step by step:

1. the agent's registrar record over mTLS (after ``/version`` negotiation);
2. optionally its EK certificate against the tenant's EK trust store;
3. the agent's ``/version`` (its registered ``mtls_cert`` pinned);
4. an identity quote with a fresh nonce, checked with the registrar's AK, and PCR 16 bound to
   the NK the agent returned: a quote that does not verify stops here, nothing is enrolled;
5. K = U xor V; U (RSA-OAEP to the NK), the auth tag and the payload (AES-GCM under K) to the agent;
6. the enrolment POST to the verifier (V and everything upstream's tenant sends);
7. wait until the verifier reports ``wait_for_state`` (GET_QUOTE);
8. ``keys/verify``: the agent proves it derived K (HMAC-SHA384(K, challenge)).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

import keytrio.actors.tenant.ekcheck as ekcheck
from keytrio.actors.tenant.client import Peer
from keytrio.actors.tenant.context import TenantContext
from keytrio.actors.tenant.errors import Refused, UsageError, VerificationFailed
from keytrio.actors.tenant.payload import REVOCATION_CERT, add_files, make_payload
from keytrio.actors.tenant.quotecheck import check_identity_quote
from keytrio.protocol import payload as pl
from keytrio.protocol import safejson, states, validation
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.wire import KeyVerify, ReplyError, UKey

if TYPE_CHECKING:
    from cryptography import x509

DEFAULT_HASH_ALGS = ("sha256", "sha384", "sha512")
DEFAULT_ENCRYPTION_ALGS = ("rsa", "ecc")
DEFAULT_SIGNING_ALGS = ("rsassa", "ecdsa")
_ALNUM = string.ascii_letters + string.digits


@dataclass
class AddResult:
    agent_id: str
    registrar_version: str
    verifier_version: str
    agent_version: str
    agent_url: str
    hash_alg: str
    enc_alg: str
    sign_alg: str
    nk_pem: str
    operational_state: int | None  # last state seen (None when not waited for)
    verified: bool  # keys/verify answered the right HMAC
    k: bytes = field(repr=False)  # the bootstrap key: secret, never logged

    @property
    def operational_state_name(self) -> str | None:
        return None if self.operational_state is None else states.name(self.operational_state)


def new_challenge(length: int = 20) -> str:
    """A nonce/challenge as upstream makes them: 20 characters [A-Za-z0-9]."""
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


@dataclass(frozen=True)
class AddRequest:
    """Everything one enrolment needs (the CLI builds one from its flags and configuration).

    ``tpm_policy``: PCR -> [accepted hex] plus ``"mask"`` (default ``{"mask": "0x0"}``: PCR 16
    only, which the verifier always checks). ``runtime_policy``: the policy JSON (sent base64;
    None/empty = none). ``payload``: a zip (see :func:`actors.tenant.payload.make_payload`);
    ``revocation_cert_pem`` is added to it as ``RevocationNotifier-cert.crt``. ``ek_trust_store``:
    CA files/dirs (or certificates); None skips the EK check. ``timeout`` bounds steps 7 and 8 (each).
    """

    agent_id: str
    tpm_policy: Mapping[str, Any] | str | None = None
    runtime_policy: bytes | str | None = None
    runtime_policy_name: str | None = None
    runtime_policy_key: str | None = None
    mb_policy: str | None = None
    mb_policy_name: str | None = None
    ima_sign_verification_keys: str | None = None
    payload: bytes | None = field(default=None, repr=False)
    revocation_key_pem: str | None = field(default=None, repr=False)
    revocation_cert_pem: str | None = None
    metadata: Mapping[str, Any] | None = None
    accept_tpm_hash_algs: Iterable[str] = DEFAULT_HASH_ALGS
    accept_tpm_encryption_algs: Iterable[str] = DEFAULT_ENCRYPTION_ALGS
    accept_tpm_signing_algs: Iterable[str] = DEFAULT_SIGNING_ALGS
    ek_trust_store: Iterable[str | os.PathLike[str] | x509.Certificate] | None = None
    verify: bool = True
    wait_for_state: int | None = states.GET_QUOTE
    timeout: float = 30.0


@dataclass(frozen=True)
class _Checked:
    """The request after the local checks (nothing sent yet): what goes on the wire."""

    tpm_policy: str
    runtime_policy: str
    ek_store: list[x509.Certificate] | None
    payload: bytes | None
    hash_algs: list[str]
    enc_algs: list[str]
    sign_algs: list[str]


@dataclass(frozen=True)
class _Registration:
    """The fields of the agent's registrar record the add flow uses."""

    aik_tpm: str
    ek_tpm: str
    mtls_cert: str
    ip: str
    port: int
    ekcert: object  # as the registrar sent it; checked only when there is a trust store


@dataclass(frozen=True)
class _Identity:
    """The agent's identity-quote reply, checked."""

    hash_alg: str
    enc_alg: str
    sign_alg: str
    nk_pem: str


async def add_agent(t: TenantContext, req: AddRequest) -> AddResult:
    """Run the add flow of the module docstring for ``req``."""
    checked = check_request(req)
    registrar = await t.ready(t.registrar)
    reg = await _registration(registrar, req.agent_id)  # 1
    if checked.ek_store is not None:  # 2
        ekcheck.check_ek(reg.ekcert, reg.ek_tpm, checked.ek_store)
    verifier = await t.ready(t.verifier)
    async with t.agent(reg.ip, reg.port, reg.mtls_cert) as agent:  # 3
        assert agent.version is not None
        ident = await _identity(agent, reg, checked)  # 4
        halves = await _send_u(agent, req.agent_id, ident.nk_pem, checked.payload)  # 5
        body = enrolment_body(req, checked, reg, halves.v, agent.version)  # 6
        await verifier.call("POST", f"/agents/{req.agent_id}", body)
        state = None  # 7
        if req.wait_for_state is not None:
            state = await wait_for(t, req.agent_id, req.wait_for_state, timeout=req.timeout)
        if req.verify:  # 8
            await verify_key(t, agent, halves.k, timeout=req.timeout)
    assert registrar.version is not None and verifier.version is not None
    return AddResult(
        agent_id=req.agent_id,
        registrar_version=registrar.version,
        verifier_version=verifier.version,
        agent_version=agent.version,
        agent_url=agent.base_url,
        hash_alg=ident.hash_alg,
        enc_alg=ident.enc_alg,
        sign_alg=ident.sign_alg,
        nk_pem=ident.nk_pem,
        operational_state=state,
        verified=req.verify,
        k=halves.k,
    )


def check_request(req: AddRequest) -> _Checked:
    """Every local check before anything is sent: a usage error changes nothing anywhere."""
    policy_text = _tpm_policy_text(req.tpm_policy, ima=bool(req.runtime_policy or req.runtime_policy_name))
    runtime_b64 = _runtime_policy_b64(req.runtime_policy)
    store = ekcheck.load_trust_store(req.ek_trust_store) if req.ek_trust_store is not None else None
    payload = req.payload
    if req.revocation_cert_pem is not None:
        _check_pem(req.revocation_cert_pem, "revocation_cert_pem")
        extra = {REVOCATION_CERT: req.revocation_cert_pem}
        payload = add_files(payload, extra) if payload else make_payload(extra=extra)
    if req.revocation_key_pem is not None:
        _check_pem(req.revocation_key_pem, "revocation_key_pem")
    return _Checked(
        tpm_policy=policy_text,
        runtime_policy=runtime_b64,
        ek_store=store,
        payload=payload,
        hash_algs=list(req.accept_tpm_hash_algs),
        enc_algs=list(req.accept_tpm_encryption_algs),
        sign_algs=list(req.accept_tpm_signing_algs),
    )


async def _registration(registrar: Peer, agent_id: str) -> _Registration:
    record = (await registrar.call("GET", f"/agents/{agent_id}")).results
    aik_tpm, ek_tpm, mtls_cert, ip, port = _record_fields(record)
    return _Registration(aik_tpm, ek_tpm, mtls_cert, ip, port, record.get("ekcert"))


async def _identity(agent: Peer, reg: _Registration, checked: _Checked) -> _Identity:
    """Step 4: an identity quote for a fresh nonce, checked against the registered AK."""
    nonce = new_challenge()
    reply = (await agent.call("GET", "/quotes/identity", params={"nonce": nonce})).results
    q = check_identity_quote(reply, aik_tpm=reg.aik_tpm, nonce=nonce, hash_algs=checked.hash_algs,
                             enc_algs=checked.enc_algs, sign_algs=checked.sign_algs)
    return _Identity(q.hash_alg, q.enc_alg, q.sign_alg, q.pubkey)


async def _send_u(agent: Peer, agent_id: str, nk_pem: str, payload: bytes | None) -> pl.KeyHalves:
    """Step 5: K = U xor V; U (encrypted to the NK), the auth tag and the payload to the agent."""
    halves = pl.new_key_halves(os.urandom(64))
    try:
        encrypted_u = pl.encrypt_key_half(nk_pem, halves.u)
    except pl.PayloadError as exc:  # e.g. an EC NK: upstream tenants refuse those too
        raise VerificationFailed("agent NK", str(exc)) from exc
    sealed = pl.encrypt_payload(halves.k, payload, os.urandom(16)) if payload else None
    ukey = UKey(encrypted_u, pl.auth_tag(halves.k, agent_id), sealed)
    await agent.call("POST", "/keys/ukey", ukey.encode())
    return halves


def enrolment_body(req: AddRequest, checked: _Checked, reg: _Registration, v: bytes,
                   agent_version: str) -> dict[str, Any]:
    """Step 6: the verifier's enrolment body (V and everything upstream's tenant sends)."""
    return {
        "v": base64.b64encode(v).decode("ascii"),
        "cloudagent_ip": reg.ip,
        "cloudagent_port": reg.port,
        "tpm_policy": checked.tpm_policy,
        "runtime_policy": checked.runtime_policy,
        "runtime_policy_name": req.runtime_policy_name,
        "runtime_policy_key": req.runtime_policy_key or "",
        "mb_policy": req.mb_policy,
        "mb_policy_name": req.mb_policy_name,
        "ima_sign_verification_keys": req.ima_sign_verification_keys or "",
        "metadata": json.dumps(dict(req.metadata or {})),
        "revocation_key": req.revocation_key_pem or "",
        "accept_tpm_hash_algs": checked.hash_algs,
        "accept_tpm_encryption_algs": checked.enc_algs,
        "accept_tpm_signing_algs": checked.sign_algs,
        "ak_tpm": reg.aik_tpm,
        "mtls_cert": reg.mtls_cert,
        "supported_version": agent_version,
    }
async def wait_for(t: TenantContext, agent_id: str, wanted: int, *, timeout: float) -> int:
    """Poll the verifier's record until ``operational_state == wanted``. VerificationFailed when
    it reaches a final state instead, or on timeout (naming the states seen)."""
    seen: list[int] = []
    with trio.move_on_after(timeout):
        while True:
            res = (await t.verifier.call("GET", f"/agents/{agent_id}")).results
            state = res.get("operational_state")
            if isinstance(state, int) and (not seen or seen[-1] != state):
                seen.append(state)
            if state == wanted:
                return state
            if state in states.FINAL:
                raise VerificationFailed(
                    "verifier state",
                    f"agent reached {states.name(state)} instead of {states.name(wanted)}"
                    f" (last event {res.get('last_event_id')!r})",
                    seen=seen,
                )
            await trio.sleep(t.poll_interval)
    seen_text = ", ".join(states.name(s) for s in seen) or "nothing"
    raise VerificationFailed(
        "verifier state", f"not {states.name(wanted)} after {timeout:g} s (seen: {seen_text})", seen=seen
    )


async def verify_key(t: TenantContext, agent: Peer, k: bytes, *, timeout: float) -> None:
    """``GET keys/verify`` until the agent proves K: HMAC-SHA384(K, challenge).

    Before the verifier delivered V the agent answers 400 (no K yet), or, on a re-enrolment, the
    HMAC of its previous K; both are retried until ``timeout``, then VerificationFailed."""
    last = "no answer"
    with trio.move_on_after(timeout):
        while True:
            challenge = new_challenge()
            reply = await agent.call("GET", "/keys/verify", params={"challenge": challenge}, expect=(200, 400))
            if reply.status_code == 200:
                try:
                    got = KeyVerify.decode(reply.results).hmac
                except ReplyError:
                    got = ""
                want = pl.verify_hmac(k, challenge)
                if got and hmac.compare_digest(got.lower().encode(), want.encode()):
                    return
                last = "an HMAC that does not match K"
            else:
                last = f"HTTP 400 {reply.status}"
            await trio.sleep(t.poll_interval)
    raise VerificationFailed("keys/verify", f"the agent did not prove K within {timeout:g} s (last answer: {last})")


# --- helpers ----------------------------------------------------------------------------------------


def _tpm_policy_text(policy: Mapping[str, Any] | str | None, *, ima: bool = False) -> str:
    if policy is None:
        policy = {"mask": "0x0"}
    if isinstance(policy, str):
        try:
            policy = safejson.loads(policy)
        except safejson.JsonError as exc:
            raise UsageError(f"tpm_policy: {exc.reason}") from exc
    if not isinstance(policy, Mapping):
        raise UsageError("tpm_policy must be an object: PCR -> [hex values], plus 'mask'")
    doc = {str(k): v for k, v in policy.items()}
    # The mask must name every PCR the policy lists; add them rather than silently check nothing.
    pcrs = set()
    for key, values in doc.items():
        if key == "mask":
            continue
        try:
            validation.pcr_number(key)
        except ProtocolError:
            raise UsageError(f"tpm_policy: {key[:16]!r} is not a PCR number") from None
        vals = [values] if isinstance(values, str) else values
        if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
            raise UsageError(f"tpm_policy: PCR {key} needs a list of hex digests")
        doc[key] = [v.lower().removeprefix("0x") for v in vals]
        pcrs.add(int(key))
    try:
        mask = validation.pcr_mask(doc.get("mask", "0x0"), "tpm_policy.mask")
    except ProtocolError as exc:
        raise UsageError(str(exc)) from exc
    for p in pcrs:
        mask |= 1 << p
    if ima:
        # A runtime policy is enforced on PCR 10: upstream's verifier asks only for the PCRs of the
        # mask, so without this bit it would never check the IMA log (upstream's tenant sets it too).
        mask |= 1 << 10
    doc["mask"] = hex(mask)
    return json.dumps(doc)


def _runtime_policy_b64(policy: bytes | str | None) -> str:
    if not policy:
        return ""
    raw = policy.encode("utf-8") if isinstance(policy, str) else bytes(policy)
    try:
        safejson.loads(raw)
    except safejson.JsonError as exc:
        raise UsageError(f"runtime_policy: {exc.reason}") from exc
    return base64.b64encode(raw).decode("ascii")


def _check_pem(text: object, name: str) -> None:
    if not isinstance(text, str) or "-----BEGIN" not in text:
        raise UsageError(f"{name} must be PEM text")


def _record_fields(record: dict[str, Any]) -> tuple[str, str, str, str, int]:
    aik, ek, cert, ip, port = (record.get(k) for k in ("aik_tpm", "ek_tpm", "mtls_cert", "ip", "port"))
    if not isinstance(aik, str) or not isinstance(ek, str):
        raise Refused("registrar", 200, "record without aik_tpm/ek_tpm")
    if not isinstance(cert, str) or "-----BEGIN CERTIFICATE-----" not in cert:
        if not ip and not port:  # what a push agent registers: it listens on no port
            raise VerificationFailed("registrar record", "no mtls_cert and no contact address: the agent "
                                                         "registered as a push-mode agent (API v3.0)")
        raise VerificationFailed("registrar record", "no mtls_cert: the agent cannot be authenticated")
    if not isinstance(ip, str) or not ip or not isinstance(port, int) or isinstance(port, bool):
        raise Refused("registrar", 200, "record without a contact ip/port")
    return aik, ek, cert, ip, port
