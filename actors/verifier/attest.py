"""One attestation round of the verifier's monitor against one agent.

* :func:`attest_once` = fresh nonce -> :func:`fetch_quote` (``GET quotes/integrity``) ->
  :func:`evaluate` (pure: reply types, quote, PCR 16 binding, ``tpm_policy`` PCRs, IMA hook).
* :func:`deliver_v` posts the V key half once the first quote was good.

Communication problems are not failures here: ``request_json`` raises
:class:`~actors.common.client.CommunicationError` / :class:`~actors.common.client.HttpError` /
:class:`~actors.common.client.MalformedResponse` and the monitor decides about retries and
states. Everything the agent *says* is hostile input: a wrong type or an undecodable quote is a
:class:`~protocol.failures.Failure`, never an exception.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import secrets
import ssl
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from keytrio.actors.common import tls
from keytrio.actors.common.client import DEFAULT_MAX_RESPONSE_BYTES, KeepAliveClient, request_json
from keytrio.protocol import mb_policy as mbp
from keytrio.protocol import payload, tpm2, validation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.quote import ClockInfo, parse_quote
from keytrio.protocol.quote_check import (
    INVALID_ENC_ALG,
    INVALID_QUOTE,
    PCR_16,
    QuoteCheck,
    check_pcr16,
    check_quote,
)

PCR_IMA = 10
NONCE_LEN = 20  # what upstream's verifier sends
_NONCE_CHARS = string.ascii_letters + string.digits
MAX_QUOTE_RESPONSE_BYTES = DEFAULT_MAX_RESPONSE_BYTES  # IMA lists can be large; still capped
CHECK_RESPONSE = "response"  # context["check"] of a malformed-reply failure (wrong/missing field)
#: upstream's id for an agent reply it cannot read ("parsing agent get quote response failed")
INVALID_DATA = "qoute_validation.invalid_data"

#: PCR 10 verdicts recorded in AttestState.pcr10 (never "passed" without a runtime policy)
PCR10_NOT_CHECKED = "not_checked"
PCR10_NOT_QUOTED = "not_quoted"
PCR10_CHECKED = "checked"

# IMA hook (filled by the IMA issue): (ima_measurement_list text or None, its first entry number,
# quoted PCRs, bank) -> (failures, number of lines verified so far, i.e. the next ima_ml_entry)
ImaCheck = Callable[[str | None, int, dict[int, bytes], str], tuple[list[Failure], int]]


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
    ima_check: ImaCheck | None = None  # None: no runtime policy -> PCR 10 "not checked"
    # measured boot: the reference state as JSON text (None/"{}": no measured-boot checks) and
    # when to evaluate it ("once": first good quote of each boot; "always": every quote). The
    # UEFI log is replayed against the quoted PCRs on every quote either way.
    mb_policy: str | None = None
    mb_evaluate: str = "once"
    _mb_ref: mbp.RefState | None = field(default=None, init=False, repr=False)

    @property
    def mb_refstate(self) -> mbp.RefState | None:
        """The parsed reference state (validated at enrolment; parsed once here)."""
        if self._mb_ref is None and self.mb_policy and not mbp.is_empty(self.mb_policy):
            self._mb_ref = mbp.parse_refstate(self.mb_policy)
        return self._mb_ref

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


_NONCE_SPACE = len(_NONCE_CHARS) ** NONCE_LEN


def new_nonce() -> str:
    """NONCE_LEN uniform random letters/digits from ONE CSPRNG draw (per-character
    ``secrets.choice`` reads the OS RNG 20 times: a measurable share of a poll)."""
    n = secrets.randbelow(_NONCE_SPACE)
    out = []
    for _ in range(NONCE_LEN):
        n, d = divmod(n, len(_NONCE_CHARS))
        out.append(_NONCE_CHARS[d])
    return "".join(out)


# --- tpm_policy ----------------------------------------------------------------------------------


def policy_pcrs(tpm_policy: dict[str, Any]) -> dict[int, list[str]]:
    """PCR -> accepted lowercase hex values (a single string counts as a one-item list).

    Enrolment validates the policy; whatever slipped through is skipped here rather than crash.
    """
    out: dict[int, list[str]] = {}
    for key, values in tpm_policy.items():
        try:
            pcr = validation.pcr_number(key)
        except ValidationError:
            continue  # "mask" and any other metadata
        if isinstance(values, str):
            values = [values]
        if isinstance(values, list):
            out[pcr] = [v.lower().removeprefix("0x") for v in values if isinstance(v, str)]
    return out


def quote_mask(target: AgentTarget) -> str:
    """The mask to ask for: the policy's mask and PCRs | PCR 16 (| PCR 10 with a runtime policy)."""
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
    if target.mb_refstate is not None:
        for pcr in mbp.MEASUREDBOOT_PCRS:  # as upstream: PCRs 0-9 and 11-15 with an mb policy
            mask |= 1 << pcr
    if target.ima_check is not None:
        mask |= 1 << PCR_IMA
    return hex(mask)


# --- one round -----------------------------------------------------------------------------------


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
    params = {
        "nonce": nonce,
        "mask": quote_mask(target),
        "partial": partial,
        "ima_ml_entry": str(state.ima_ml_entry),
    }
    reply = await request_json(
        client,
        "GET",
        target.base_url + "/quotes/integrity",
        params=params,
        max_response_bytes=max_response_bytes,
    )
    return reply.results


def _response_failure(message: str, **extra: object) -> Failure:
    ctx: dict[str, object] = {"message": message, "check": CHECK_RESPONSE}
    ctx.update(extra)
    return Failure(INVALID_DATA, ctx, Severity.EMERGENCY, recoverable=False)


def _typed_fields(reply: object, need_pubkey: bool) -> tuple[dict[str, Any], list[Failure]]:
    """Pick the reply fields we use, checking their types (hostile types -> failures)."""
    if not isinstance(reply, dict):
        return {}, [_response_failure("quote reply results are not an object")]
    fails: list[Failure] = []
    out: dict[str, Any] = {}
    required = ["quote", "hash_alg", "enc_alg", "sign_alg"] + (["pubkey"] if need_pubkey else [])
    for name in required:
        value = reply.get(name)
        if value is None:
            fails.append(_response_failure(f"{name} is missing", field=name))
        elif not isinstance(value, str):
            fails.append(_response_failure(f"{name} must be a string", field=name))
        else:
            out[name] = value
    boottime = reply.get("boottime")
    if boottime is not None:
        # bounded: stored in 64-bit columns (a 60-digit integer is valid JSON)
        if not isinstance(boottime, int) or _bounded(boottime, _MAX_STORED_INT) is None:
            fails.append(_response_failure("boottime must be an integer", field="boottime"))
        else:
            out["boottime"] = boottime
    ml = reply.get("ima_measurement_list")
    if ml is not None and not isinstance(ml, str):
        fails.append(_response_failure("ima_measurement_list must be a string", field="ima_measurement_list"))
    entry = reply.get("ima_measurement_list_entry", 0)
    if not isinstance(entry, int) or _bounded(entry, _MAX_STORED_INT) is None:
        fails.append(_response_failure("ima_measurement_list_entry must be an integer >= 0",
                                       field="ima_measurement_list_entry"))
        entry = 0
    out["ima_measurement_list"] = ml if isinstance(ml, str) else None
    out["ima_measurement_list_entry"] = entry
    mb = reply.get("mb_measurement_list")
    if mb is not None and not isinstance(mb, str):
        fails.append(_response_failure("mb_measurement_list must be a string", field="mb_measurement_list"))
    out["mb_measurement_list"] = mb if isinstance(mb, str) else None
    return out, fails


_MAX_STORED_INT = (1 << 63) - 1


def _bounded(value: int, hi: int) -> int | None:
    try:
        return validation.integer(value, "value", lo=0, hi=hi)
    except ValidationError:
        return None


def decode_mb_log(value: str | None) -> bytes:
    """The UEFI event log from its base64 text (b"" when absent or not base64: a failure later)."""
    if not value:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b"\x00"  # not base64: the parser reports it as an unparseable log


def check_policy_pcrs(tpm_policy: dict[str, Any], pcrs: dict[int, bytes]) -> list[Failure]:
    """``tpm_policy`` PCR values against the quoted PCRs (PCR 16 excluded: it is the NK binding)."""
    fails: list[Failure] = []
    wanted = policy_pcrs(tpm_policy)
    missing = sorted(p for p in wanted if p not in pcrs and p != PCR_16)
    if missing:
        fails.append(Failure("pcr_validation.missing_pcrs",
                             {"context": "PCRs are missing in quote", "data": missing}, recoverable=True))
    for pcr, accepted in sorted(wanted.items()):
        # PCR 16 is the NK binding (check_pcr16), never a policy value
        if pcr == PCR_16 or pcr not in pcrs:
            continue
        got = pcrs[pcr].hex()
        if got not in accepted:
            fails.append(Failure(f"pcr_validation.invalid_pcr_{pcr}",
                                 {"pcr": pcr, "got": got, "expected": accepted}, recoverable=True))
    return fails


@dataclass
class QuoteVerdict:
    """What :func:`verify_quote_evidence` found; ``failures`` empty = every check passed."""

    failures: list[Failure]
    check: QuoteCheck | None = None
    pcr10: str = PCR10_NOT_QUOTED
    next_entry: int = 0


def verify_quote_evidence(
    quote: str,
    *,
    ak: tpm2.AkKey | bytes,
    nonce: str,
    hash_alg: str,
    tpm_policy: dict[str, Any],
    ima_check: ImaCheck | None,
    ima_list: str | None,
    ima_entry: int,
    next_entry: int = 0,
    accepted_hash_algs: Iterable[str] | None = None,
    accepted_sign_algs: Iterable[str] | None = None,
    previous_clock: ClockInfo | None = None,
    check_clock: bool = True,
    nk_pem: str | None = None,
    mb_refstate: mbp.RefState | None = None,
    mb_log: bytes | None = None,
    mb_evaluate_policy: bool = True,
    nonce_base64: bool = False,
) -> QuoteVerdict:
    """The checks shared by the monitor and ``POST /verify/evidence`` (pure; no I/O).

    With ``mb_refstate`` the UEFI log ``mb_log`` is replayed against the quoted PCRs and (when
    ``mb_evaluate_policy``) evaluated against the reference state (``measured_boot.*`` failures).

    Quote (signature, nonce, PCR select/digest, algorithms, clock unless ``check_clock`` is
    False), PCR 16 binding (only when ``nk_pem`` is given), ``tpm_policy`` PCRs, then the IMA hook
    - the hook only runs when the quote itself verified: PCR values from a quote that does not
    verify are not evidence of anything, and the result is invalid anyway.
    """
    try:
        check = check_quote(
            quote,
            ak_public=ak,
            nonce=nonce,
            hash_alg=hash_alg,
            accepted_hash_algs=accepted_hash_algs,
            accepted_sign_algs=accepted_sign_algs,
            previous_clock=previous_clock,
            check_clock_info=check_clock,
            nonce_base64=nonce_base64,
        )
    except (ProtocolError, ValueError, TypeError, OverflowError) as exc:
        # check_quote reports bad quotes as failures; this is the belt for what it might miss
        return QuoteVerdict([Failure(INVALID_QUOTE, {"message": "quote could not be checked",
                                                     "error": type(exc).__name__}, Severity.EMERGENCY)])
    fails = list(check.failures)
    verdict = QuoteVerdict(fails, check, PCR10_NOT_QUOTED, next_entry)
    if check.quote is None or check.bank is None:
        return verdict  # undecodable: nothing more to look at
    pcrs = check.pcrs
    if nk_pem is not None:
        pcr16 = check_pcr16(check.bank, pcrs, nk_pem)
        if pcr16 is not None:
            fails.append(pcr16)
    fails.extend(check_policy_pcrs(tpm_policy, pcrs))
    if mb_refstate is not None and not check.failures:
        # the UEFI log replayed against the quoted PCRs, then the reference state
        # (protocol.mb_policy.check_boot never raises on hostile logs)
        fails.extend(mbp.check_boot(mb_refstate, mb_log or b"", pcrs, check.bank,
                                    evaluate_policy=mb_evaluate_policy))
    if PCR_IMA not in pcrs:
        verdict.pcr10 = PCR10_NOT_QUOTED
    elif ima_check is None:
        verdict.pcr10 = PCR10_NOT_CHECKED  # no runtime policy: PCR 10 is unverified, never "passed"
    elif check.failures:
        verdict.pcr10 = PCR10_NOT_CHECKED
    else:
        ima_fails, verdict.next_entry = ima_check(ima_list, ima_entry, pcrs, check.bank)
        fails.extend(ima_fails)
        verdict.pcr10 = PCR10_CHECKED
    return verdict


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
    fields, fails = _typed_fields(reply, need_pubkey)
    if fails or "quote" not in fields:
        return fails
    nk_pem = fields.get("pubkey") if need_pubkey else state.nk_pem
    assert nk_pem is not None

    if fields["enc_alg"] not in target.accept_tpm_encryption_algs:
        fails.append(Failure(INVALID_ENC_ALG, {
            "message": f"encryption algorithm {fields['enc_alg']} is not accepted", "check": "algorithm"},
            Severity.EMERGENCY))
    on_boot = getattr(target.ima_check, "for_boot", None)
    if on_boot is not None:
        # the IMA progress belongs to one boot: a new boottime/resetCount starts again at line 0
        on_boot(fields.get("boottime"), _quote_reset_count(fields["quote"]))
    boot = (fields.get("boottime"), _quote_reset_count(fields["quote"]))
    mb_ref = target.mb_refstate
    evaluate_mb = target.mb_evaluate == "always" or state.mb_boot != boot
    verdict = verify_quote_evidence(
        fields["quote"],
        ak=target.ak,
        nonce=nonce,
        hash_alg=fields["hash_alg"],
        tpm_policy=target.tpm_policy,
        ima_check=target.ima_check,
        ima_list=fields["ima_measurement_list"],
        ima_entry=fields["ima_measurement_list_entry"],
        next_entry=state.ima_ml_entry,
        accepted_hash_algs=target.accept_tpm_hash_algs,
        accepted_sign_algs=target.accept_tpm_signing_algs,
        previous_clock=state.clock,
        nk_pem=nk_pem,
        mb_refstate=mb_ref,
        mb_log=decode_mb_log(fields.get("mb_measurement_list")) if mb_ref is not None else None,
        mb_evaluate_policy=evaluate_mb,
    )
    fails.extend(verdict.failures)
    if verdict.check is None or verdict.check.quote is None:
        return fails

    state.quotes_received += 1
    if fails:
        return fails
    state.clock = verdict.check.clock
    state.nk_pem = nk_pem
    state.boottime = fields.get("boottime", state.boottime)
    state.hash_alg, state.enc_alg, state.sign_alg = fields["hash_alg"], fields["enc_alg"], fields["sign_alg"]
    state.ima_ml_entry = verdict.next_entry
    state.pcr10 = verdict.pcr10
    if mb_ref is not None:
        state.mb_boot = boot  # "once": this boot's log passed; later quotes only replay it
    state.attestation_count += 1
    return fails


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
    body = {"encrypted_key": payload.encrypt_key_half(nk_pem, v)}
    await request_json(client, "POST", target.base_url + "/keys/vkey", body)
