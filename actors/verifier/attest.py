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
    PCR10_CHECKED,
    PCR10_NOT_CHECKED,
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
from keytrio.protocol.quote_check import PCR_16, check_clock, check_pcr16, signature_error
from keytrio.protocol.wire import MAX_STORED_INT, IntegrityQuote, VKey

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
    _fast: _FastChecks | None = field(default=None, init=False, repr=False)

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


@dataclass(frozen=True)
class _FastChecks:
    """A target's accepted algorithms and policy PCRs, worked out once for :func:`_evaluate_fast`."""

    hash_algs: frozenset[str]
    sign_algs: frozenset[str]
    enc_algs: frozenset[str]
    #: (pcr, accepted hex values) of the policy, PCR 16 left out as check_policy_pcrs does
    policy: tuple[tuple[int, frozenset[str]], ...]

    @classmethod
    def of(cls, target: AgentTarget) -> _FastChecks:
        wanted = policy_pcrs(target.tpm_policy)
        return cls(
            frozenset(h for h in target.accept_tpm_hash_algs if h in tpm2.HASH_ALGS),
            frozenset(target.accept_tpm_signing_algs),
            frozenset(target.accept_tpm_encryption_algs),
            tuple((pcr, frozenset(values)) for pcr, values in sorted(wanted.items()) if pcr != PCR_16),
        )


_FAST_ERRORS = (ProtocolError, ValueError, TypeError, OverflowError)


def _evaluate_fast(target: AgentTarget, state: AttestState, reply: object, nonce: str) -> list[Failure] | None:
    """The verdict of a steady-state reply whose quote passes every check, or None: let the
    general path decide.

    A poll otherwise builds IntegrityQuote, Expectations, Evidence, QuoteCheck and Verdict objects
    and failure lists that are empty nearly every time. Here each check is a yes/no over the
    decoded quote, and the first "no" (or anything unusual: the first quote of a monitor, measured
    boot, a field of an unexpected type) hands the whole reply to :func:`evaluate`'s general path
    before anything changed, so every failure and its wording still come from that one place.
    Only the IMA check has effects (its progress): it runs last, when everything before it passed,
    exactly as the general path would run it, and its result is the verdict as it is there.
    """
    nk_pem = state.nk_pem
    if nk_pem is None or type(reply) is not dict or target.mb_check is not None:
        return None
    ak = target.ak
    if not isinstance(ak, tpm2.AkKey):
        return None
    get = reply.get
    text, hash_alg, enc_alg, sign_alg = get("quote"), get("hash_alg"), get("enc_alg"), get("sign_alg")
    if type(text) is not str or type(hash_alg) is not str or type(enc_alg) is not str \
            or type(sign_alg) is not str:
        return None
    boottime = get("boottime")
    if boottime is not None and (type(boottime) is not int or not 0 <= boottime <= MAX_STORED_INT):
        return None
    ima_list = get("ima_measurement_list")
    entry = get("ima_measurement_list_entry", 0)
    mb = get("mb_measurement_list")
    if (ima_list is not None and type(ima_list) is not str) or type(entry) is not int \
            or not 0 <= entry <= MAX_STORED_INT or (mb is not None and type(mb) is not str):
        return None
    fast = target._fast
    if fast is None:
        fast = target._fast = _FastChecks.of(target)
    if enc_alg not in fast.enc_algs or hash_alg not in fast.hash_algs:
        return None
    try:
        q = parse_quote(text)
        sig = q.sig
        sig_hash = tpm2.HASH_NAMES.get(sig.hash_alg)
        sig_name = tpm2.SIGN_NAMES.get(sig.sig_alg)
        info = q.info
        pcrs = q.pcrs
        bank = q.bank
        order = sorted(pcrs)
        sel = info.pcr_select
        if sig_hash != hash_alg or sig_name is None or sig_name not in fast.sign_algs \
                or sig_name != ak.sign_alg or sig_hash != ak.hash_alg \
                or info.extra_data != nonce.encode("utf-8") \
                or bank != hash_alg or len(sel) != 1 or sel[0].bank != bank or sel[0].pcrs != tuple(order) \
                or tpm2.digest(sig_hash, b"".join([pcrs[p] for p in order])) != info.pcr_digest \
                or check_clock(info.clock, state.clock) is not None \
                or check_pcr16(bank, pcrs, nk_pem) is not None:
            return None
        for pcr, accepted in fast.policy:
            value = pcrs.get(pcr)
            if value is None or value.hex() not in accepted:
                return None
        # last of the pure checks: the dearest, and the one that nearly always passes
        if signature_error(ak, sig.sig_alg, sig_hash, q) is not None:
            return None
    except _FAST_ERRORS:
        return None  # the general path has the belt for these and names them

    ima = target.ima_check
    pcr10 = PCR10_NOT_QUOTED
    next_entry: int | None = None
    fails: list[Failure] = []
    quoted10 = pcrs.get(IMA_PCR)
    if ima is None:
        if quoted10 is not None:
            pcr10 = PCR10_NOT_CHECKED
    else:
        # nothing new (no line, same boot, PCR 10 unchanged: nearly every poll) -> the hook's own
        # exit, with the effects of for_boot + the call below; an ImaHook without one, or anything
        # new (PCR 10 not quoted included: the exit refuses a None), takes those two calls
        quiet = getattr(ima, "nothing_new", None)
        if quiet is not None and quiet(ima_list, entry, boottime, info.clock.reset_count, quoted10, bank):
            next_entry = ima.progress.count
            pcr10 = PCR10_CHECKED
        else:
            ima.for_boot(boottime, info.clock.reset_count)
            if quoted10 is not None:
                fails, next_entry = ima(ima_list, entry, dict(pcrs), bank)
                pcr10 = PCR10_CHECKED

    state.quotes_received += 1
    if fails:
        return fails
    state.clock = info.clock
    if boottime is not None:
        state.boottime = boottime
    state.hash_alg, state.enc_alg, state.sign_alg = hash_alg, enc_alg, sign_alg
    if next_entry is not None:
        state.ima_ml_entry = next_entry
    state.pcr10 = pcr10
    state.attestation_count += 1
    return fails


def evaluate(target: AgentTarget, state: AttestState, reply: object, nonce: str) -> list[Failure]:
    """Check one integrity-quote reply; update ``state`` only when nothing failed. Pure, no I/O."""
    fast = _evaluate_fast(target, state, reply, nonce)
    if fast is not None:
        return fast
    return _evaluate_general(target, state, reply, nonce)


def _evaluate_general(target: AgentTarget, state: AttestState, reply: object, nonce: str) -> list[Failure]:
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
