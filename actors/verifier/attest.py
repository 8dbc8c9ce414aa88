"""One attestation round of the verifier's monitor against one agent.

* :func:`attest_once` = fresh nonce -> :func:`fetch_quote` (``GET quotes/integrity``) ->
  :func:`evaluate` (pure: the reply decoded by :class:`protocol.wire.IntegrityQuote`, then the
  verdict of :func:`protocol.evidence.verify` against this agent's expectations).
* :func:`deliver_v` posts the V key half once the first quote was good.

Communication problems are not failures here: ``request_json`` raises
:class:`~actors.common.client.CommunicationError` / :class:`~actors.common.client.HttpError` /
:class:`~actors.common.client.MalformedResponse` and the monitor decides about retries and
states. Everything the agent *says* is hostile input: a wrong type or an undecodable quote is a
:class:`~protocol.failures.Failure`, never an exception.
"""

from __future__ import annotations

import functools
import os
import ssl
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from keytrio.actors.common import tls
from keytrio.actors.common.client import DEFAULT_MAX_RESPONSE_BYTES, KeepAliveClient, request_json
from keytrio.protocol import mb_policy as mbp
from keytrio.protocol import payload, tpm2
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.evidence import (
    PCR10_NOT_QUOTED,
    Expectations,
    ImaHook,
    RefStateCheck,
    policy_pcrs,
    verify,
)
from keytrio.protocol.failures import Failure
from keytrio.protocol.ima import IMA_PCR
from keytrio.protocol.quote import ClockInfo, parse_quote
from keytrio.protocol.quote_check import PCR_16
from keytrio.protocol.wire import IntegrityQuote, VKey

NONCE_LEN = 20  # what upstream's verifier sends
_NONCE_CHARS = string.ascii_letters + string.digits
MAX_QUOTE_RESPONSE_BYTES = DEFAULT_MAX_RESPONSE_BYTES  # IMA lists can be large; still capped


@dataclass
class AgentTarget:
    """What the verifier knows about one enrolled agent (parsed once, used every poll)."""

    agent_id: str
    ip: str
    port: int
    mtls_cert: str
    ak: tpm2.AkKey
    tpm_policy: dict[str, Any] = field(default_factory=dict)
    accept_tpm_hash_algs: list[str] = field(default_factory=lambda: ["sha512", "sha384", "sha256"])
    accept_tpm_signing_algs: list[str] = field(default_factory=lambda: ["ecschnorr", "rsassa"])
    accept_tpm_encryption_algs: list[str] = field(default_factory=lambda: ["ecc", "rsa"])
    supported_version: str = "2.1"
    ima_check: ImaHook | None = None  # None: no runtime policy -> PCR 10 "not checked"
    # measured boot: the reference state as JSON text (None/"{}": no measured-boot checks) and
    # when to evaluate it ("once": first good quote of each boot; "always": every quote). The
    # UEFI log is replayed against the quoted PCRs on every quote either way.
    mb_policy: str | None = None
    mb_evaluate: str = "once"
    _mb_check: RefStateCheck | None = field(default=None, init=False, repr=False)
    _mask: str | None = field(default=None, init=False, repr=False)
    _quotes_url: str | None = field(default=None, init=False, repr=False)

    @property
    def mb_check(self) -> RefStateCheck | None:
        """The measured-boot check of the reference state (validated at enrolment; parsed once here)."""
        if self._mb_check is None:
            self._mb_check = RefStateCheck.from_text(self.mb_policy)
        return self._mb_check

    @property
    def base_url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"https://{host}:{self.port}/v{self.supported_version}"


@dataclass
class AttestState:
    """Per-agent memory between polls; :func:`evaluate` updates it only after a good quote."""

    clock: ClockInfo | None = None
    ima_ml_entry: int = 0
    nk_pem: str | None = None
    boottime: int | None = None
    hash_alg: str | None = None
    enc_alg: str | None = None
    sign_alg: str | None = None
    pcr10: str = PCR10_NOT_QUOTED
    quotes_received: int = 0
    attestation_count: int = 0
    mb_boot: tuple[Any, ...] | None = None  # the boot whose UEFI log passed the mb policy


def agent_ssl_context(
    ca_files: Iterable[os.PathLike[str] | str],
    client_cert: os.PathLike[str] | str,
    client_key: os.PathLike[str] | str,
    mtls_cert_pem: str,
) -> ssl.SSLContext:
    """Client context for one agent: our client cert; trust = CA + the agent's pinned mtls_cert."""
    return tls.client_context(ca_files, client_cert, client_key, pinned_server_cert_pem=mtls_cert_pem)


# byte b < 248 -> _NONCE_CHARS[b % 62] (248 = 4 x 62: every letter equally likely); 248-255 dropped
_NONCE_TABLE = bytes(ord(_NONCE_CHARS[b % len(_NONCE_CHARS)]) if b < 248 else 0 for b in range(256))
_NONCE_DROP = bytes(range(248, 256))


def new_nonce() -> str:
    """NONCE_LEN uniform random letters/digits from the OS CSPRNG: random bytes mapped in C
    (rejection of the 8 byte values that would bias it), not a Python loop per character."""
    while True:
        chars = os.urandom(2 * NONCE_LEN).translate(_NONCE_TABLE, _NONCE_DROP)
        if len(chars) >= NONCE_LEN:  # 40 bytes lose more than 20 with probability ~1e-17
            return chars[:NONCE_LEN].decode("ascii")


# --- one round -----------------------------------------------------------------------------------


def quote_mask(target: AgentTarget) -> str:
    """The mask to ask for: the policy's mask and PCRs | PCR 16 (| PCR 10 with a runtime policy).

    Worked out once per target (its policies do not change while a monitor uses it)."""
    if target._mask is None:
        target._mask = _quote_mask(target)
    return target._mask


def _quote_mask(target: AgentTarget) -> str:
    mask = 0
    raw = target.tpm_policy.get("mask")
    if isinstance(raw, str):
        try:
            mask = int(raw, 16) & 0xFFFFFF
        except ValueError:
            mask = 0
    for pcr in policy_pcrs(target.tpm_policy):
        mask |= 1 << pcr
    mask |= 1 << PCR_16
    if target.mb_check is not None:
        for pcr in mbp.MEASUREDBOOT_PCRS:  # as upstream: PCRs 0-9 and 11-15 with an mb policy
            mask |= 1 << pcr
    if target.ima_check is not None:
        mask |= 1 << IMA_PCR
    return hex(mask)


def quotes_url(target: AgentTarget) -> str:
    """``.../quotes/integrity`` of this agent (built once per target)."""
    if target._quotes_url is None:
        target._quotes_url = target.base_url + "/quotes/integrity"
    return target._quotes_url


async def fetch_quote(
    client: httpx.AsyncClient | KeepAliveClient,
    target: AgentTarget,
    state: AttestState,
    nonce: str,
    *,
    max_response_bytes: int = MAX_QUOTE_RESPONSE_BYTES,
) -> dict:
    """GET quotes/integrity; partial=0 until we hold the agent's NK (we need its pubkey)."""
    partial = "1" if state.nk_pem is not None else "0"
    # every value is URL-safe as it is (letters/digits nonce, hex mask, digits): no urlencode
    url = (f"{quotes_url(target)}?nonce={nonce}&mask={quote_mask(target)}&partial={partial}"
           f"&ima_ml_entry={int(state.ima_ml_entry)}")
    reply = await request_json(client, "GET", url, max_response_bytes=max_response_bytes)
    return reply.results


def _quote_reset_count(quote: object) -> int | None:
    """resetCount of an (unverified) quote, only to notice a new boot early; None if unreadable."""
    if not isinstance(quote, str):
        return None
    return _reset_count_of(quote)


@functools.lru_cache(maxsize=8)
def _reset_count_of(quote: str) -> int | None:
    # one poll asks three times (new_boot, the IMA boot hook, the mb boot key): parse once
    try:
        return parse_quote(quote).info.clock.reset_count
    except (ProtocolError, ValueError):
        return None


def new_boot(state: AttestState, reply: object) -> bool:
    """True when the reply is from another boot than the state's (boottime or resetCount changed)."""
    if not isinstance(reply, dict):
        return False
    boottime = reply.get("boottime")
    if isinstance(boottime, int) and not isinstance(boottime, bool) and state.boottime is not None \
            and boottime != state.boottime:
        return True
    reset = _quote_reset_count(reply.get("quote"))
    return reset is not None and state.clock is not None and reset != state.clock.reset_count


def evaluate(target: AgentTarget, state: AttestState, reply: object, nonce: str) -> list[Failure]:
    """Check one integrity-quote reply; update ``state`` only when nothing failed. Pure, no I/O."""
    need_pubkey = state.nk_pem is None
    answer, fails = IntegrityQuote.decode(reply, need_pubkey=need_pubkey)
    if answer is None:
        return fails
    nk_pem = answer.pubkey if need_pubkey else state.nk_pem
    assert nk_pem is not None

    boot = (answer.boottime, _quote_reset_count(answer.quote))
    if target.ima_check is not None:
        # the IMA progress belongs to one boot: a new boottime/resetCount starts again at line 0
        target.ima_check.for_boot(*boot)
    mb_check = target.mb_check
    expect = Expectations(
        ak=target.ak,
        nonce=nonce,
        tpm_policy=target.tpm_policy,
        accepted_hash_algs=tuple(target.accept_tpm_hash_algs),
        accepted_sign_algs=tuple(target.accept_tpm_signing_algs),
        accepted_enc_algs=tuple(target.accept_tpm_encryption_algs),
        previous_clock=state.clock,
        nk_pem=nk_pem,
        ima=target.ima_check,
        measured_boot=mb_check,
        evaluate_boot_policy=target.mb_evaluate == "always" or state.mb_boot != boot,
    )
    verdict = verify(expect, answer.evidence(boot_log=mb_check is not None))
    if not verdict.decoded:
        return verdict.failures

    state.quotes_received += 1
    if verdict.failures:
        return verdict.failures
    assert verdict.check is not None
    state.clock = verdict.check.clock
    state.nk_pem = nk_pem
    if answer.boottime is not None:
        state.boottime = answer.boottime
    state.hash_alg, state.enc_alg, state.sign_alg = answer.hash_alg, answer.enc_alg, answer.sign_alg
    if verdict.next_entry is not None:
        state.ima_ml_entry = verdict.next_entry
    state.pcr10 = verdict.pcr10
    if mb_check is not None:
        state.mb_boot = boot  # "once": this boot's log passed; later quotes only replay it
    state.attestation_count += 1
    return verdict.failures


async def attest_once(
    client: httpx.AsyncClient | KeepAliveClient,
    target: AgentTarget,
    state: AttestState,
    *,
    max_response_bytes: int = MAX_QUOTE_RESPONSE_BYTES,
) -> list[Failure]:
    """One poll: fresh nonce, fetch, evaluate. Communication errors propagate to the monitor."""
    nonce = new_nonce()
    reply = await fetch_quote(client, target, state, nonce, max_response_bytes=max_response_bytes)
    if (state.nk_pem is not None or state.ima_ml_entry) and new_boot(state, reply):
        # The agent rebooted (or its TPM was reset): ask again from scratch in this same poll,
        # partial=0 (its NK may be new) and ima_ml_entry=0 (a new log). Only once per poll.
        state.nk_pem = None
        state.ima_ml_entry = 0
        nonce = new_nonce()
        reply = await fetch_quote(client, target, state, nonce, max_response_bytes=max_response_bytes)
    return evaluate(target, state, reply, nonce)


async def deliver_v(client: httpx.AsyncClient | KeepAliveClient, target: AgentTarget, v: bytes, nk_pem: str) -> None:
    """POST keys/vkey with V encrypted to the agent's NK (raises HttpError on a non-200)."""
    body = VKey(payload.encrypt_key_half(nk_pem, v)).encode()
    await request_json(client, "POST", target.base_url + "/keys/vkey", body)
