"""The verdict of one quote and its logs: :func:`verify` (pure: values in, one :class:`Verdict` out).

What the verifier expects of an agent is one :class:`Expectations` value; what the agent sent is
one :class:`Evidence` value. :func:`verify` runs every check in a fixed order and collects typed
failures (:class:`~protocol.failures.Failure`, ids as upstream Keylime 7.14.3 names them):

1. encryption algorithm (when ``accepted_enc_algs`` is given): ``qoute_validation.invalid_enc_alg``;
2. the quote (:func:`protocol.quote_check.check_quote`): decode, algorithms, AK signature, nonce,
   PCR selection and digest, clock against the last good quote (``qoute_validation.*``);
3. PCR 16 binds the agent's NK (only with ``nk_pem``): ``pcr_validation.{missing,invalid}_pcr_16``;
4. ``tpm_policy`` PCR values (:func:`check_policy_pcrs`): ``pcr_validation.*``;
5. measured boot (a :class:`MeasuredBootCheck`, only when the quote itself verified);
6. IMA (an :class:`ImaCheck`, only when PCR 10 was quoted and the quote itself verified):
   PCR values from a quote that does not verify are evidence of nothing.

A quote whose signature, nonce or PCR digest does not verify is never valid. The checks of the
logs are :class:`typing.Protocol` s, so this module holds no policy store and no progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from keytrio.protocol import mb_policy as mbp
from keytrio.protocol import tpm2, validation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima import IMA_PCR
from keytrio.protocol.ima_eval import ImaProgress
from keytrio.protocol.quote import ClockInfo, ParsedQuote
from keytrio.protocol.quote_check import (
    INVALID_ENC_ALG,
    INVALID_QUOTE,
    MISSING_PCRS,
    PCR_16,
    QuoteCheck,
    check_pcr16,
    check_quote,
)

#: what became of PCR 10 in a verdict (never "checked" without an IMA check to run)
PCR10_NOT_CHECKED = "not_checked"
PCR10_NOT_QUOTED = "not_quoted"
PCR10_CHECKED = "checked"


class ImaCheck(Protocol):
    """Judges an IMA list tail against the quoted PCRs: (failures, the next entry to ask for)."""

    def __call__(
        self, list_text: str | None, first_entry: int, pcrs: dict[int, bytes], bank: str
    ) -> tuple[list[Failure], int]: ...


class ImaHook(ImaCheck, Protocol):
    """The IMA check of one monitored agent: it also carries its progress across polls and boots."""

    @property
    def progress(self) -> ImaProgress: ...

    def for_boot(self, boottime: int | None, reset_count: int | None) -> None:
        """A new boottime/resetCount starts the progress again at line 0."""

    def progress_json(self) -> str: ...


class MeasuredBootCheck(Protocol):
    """Replays a UEFI event log against the quoted PCRs and (``evaluate_policy``) judges it."""

    def __call__(
        self, log: bytes, pcrs: dict[int, bytes], bank: str, *, evaluate_policy: bool
    ) -> list[Failure]: ...


@dataclass(frozen=True)
class RefStateCheck:
    """The :class:`MeasuredBootCheck` of a measured-boot reference state (protocol.mb_policy)."""

    refstate: mbp.RefState

    @classmethod
    def from_text(cls, text: str | None) -> RefStateCheck | None:
        """None for "no policy" (None, "", "{}"); MbPolicyError for one that does not validate."""
        if not text or mbp.is_empty(text):
            return None
        return cls(mbp.parse_refstate(text))

    def __call__(
        self, log: bytes, pcrs: dict[int, bytes], bank: str, *, evaluate_policy: bool
    ) -> list[Failure]:
        # check_boot never raises on a hostile log
        return mbp.check_boot(self.refstate, log, pcrs, bank, evaluate_policy=evaluate_policy)


@dataclass(frozen=True)
class Expectations:
    """What the verifier expects of one agent's quote (``None`` = that check is not made)."""

    ak: tpm2.AkKey | bytes
    nonce: str
    #: the quote's extraData may also be the bytes the nonce's base64 decodes to (``/verify/*``)
    nonce_base64: bool = False
    tpm_policy: Mapping[str, Any] = field(default_factory=dict)
    accepted_hash_algs: tuple[str, ...] | None = None
    accepted_sign_algs: tuple[str, ...] | None = None
    accepted_enc_algs: tuple[str, ...] | None = None
    #: PCRs the quote must hold besides the policy's (``pcr_validation.missing_pcrs``)
    required_pcrs: tuple[int, ...] | None = None
    previous_clock: ClockInfo | None = None
    check_clock: bool = True
    #: the agent's NK: PCR 16 must bind it
    nk_pem: str | None = None
    ima: ImaCheck | None = None
    measured_boot: MeasuredBootCheck | None = None
    #: False: the UEFI log is only replayed, the reference state not evaluated again this boot
    evaluate_boot_policy: bool = True


@dataclass(frozen=True)
class Evidence:
    """What the agent sent: the quote string (or the quote already decoded from the same bytes,
    push_wire.parsed_quote), its claims and the logs."""

    quote: str | ParsedQuote
    hash_alg: str
    enc_alg: str | None = None
    ima_list: str | None = None
    ima_entry: int = 0
    mb_log: bytes | None = None


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found; no failures = every check passed."""

    failures: list[Failure]
    check: QuoteCheck | None = None
    pcr10: str = PCR10_NOT_QUOTED
    #: the IMA entry to ask for next (None: the IMA check did not run)
    next_entry: int | None = None

    @property
    def valid(self) -> bool:
        return not self.failures

    @property
    def decoded(self) -> bool:
        """The quote decoded (its PCRs and clock are known, whether or not it verified)."""
        return self.check is not None and self.check.quote is not None

    @property
    def quote_failures(self) -> list[Failure]:
        """The failures of the quote itself (decode, signature, nonce, digest, algorithms, clock)."""
        return list(self.check.failures) if self.check is not None else list(self.failures)


def policy_pcrs(tpm_policy: Mapping[str, Any]) -> dict[int, list[str]]:
    """PCR -> accepted lowercase hex values (a single string counts as a one-item list).

    Enrolment validates the policy; whatever slipped through is skipped here rather than crash.
    """
    out: dict[int, list[str]] = {}
    for key, values in tpm_policy.items():
        if key == "mask":  # metadata, not a PCR (and an exception per poll is not free)
            continue
        try:
            pcr = validation.pcr_number(key)
        except ValidationError:
            continue  # "mask" and any other metadata
        if isinstance(values, str):
            values = [values]
        if isinstance(values, list):
            out[pcr] = [v.lower().removeprefix("0x") for v in values if isinstance(v, str)]
    return out


def check_policy_pcrs(tpm_policy: Mapping[str, Any], pcrs: dict[int, bytes]) -> list[Failure]:
    """``tpm_policy`` PCR values against the quoted PCRs (PCR 16 excluded: it is the NK binding)."""
    fails: list[Failure] = []
    wanted = policy_pcrs(tpm_policy)
    missing = sorted(p for p in wanted if p not in pcrs and p != PCR_16)
    if missing:
        fails.append(Failure(MISSING_PCRS, {"context": "PCRs are missing in quote", "data": missing}, recoverable=True))
    for pcr, accepted in sorted(wanted.items()):
        if pcr == PCR_16 or pcr not in pcrs:
            continue
        got = pcrs[pcr].hex()
        if got not in accepted:
            fails.append(Failure(f"pcr_validation.invalid_pcr_{pcr}",
                                 {"pcr": pcr, "got": got, "expected": accepted}, recoverable=True))
    return fails


def _enc_alg_failures(expect: Expectations, enc_alg: str | None) -> list[Failure]:
    if expect.accepted_enc_algs is None or enc_alg in expect.accepted_enc_algs:
        return []
    return [Failure(INVALID_ENC_ALG, {"message": f"encryption algorithm {enc_alg} is not accepted",
                                      "check": "algorithm"}, Severity.EMERGENCY)]


def verify(expect: Expectations, evidence: Evidence) -> Verdict:
    """Every check of one quote and its logs, in the module docstring's order (pure; no I/O)."""
    fails = _enc_alg_failures(expect, evidence.enc_alg)
    try:
        check = check_quote(
            evidence.quote,
            ak_public=expect.ak,
            nonce=expect.nonce,
            hash_alg=evidence.hash_alg,
            accepted_hash_algs=expect.accepted_hash_algs,
            accepted_sign_algs=expect.accepted_sign_algs,
            previous_clock=expect.previous_clock,
            check_clock_info=expect.check_clock,
            required_pcrs=expect.required_pcrs,
            nonce_base64=expect.nonce_base64,
        )
    except (ProtocolError, ValueError, TypeError, OverflowError) as exc:
        # check_quote reports bad quotes as failures; this is the belt for what it might miss
        fails.append(Failure(INVALID_QUOTE, {"message": "quote could not be checked", "error": type(exc).__name__},
                             Severity.EMERGENCY))
        return Verdict(fails)
    fails.extend(check.failures)
    if check.quote is None or check.bank is None:
        return Verdict(fails, check)  # undecodable: nothing more to look at
    pcrs = check.pcrs
    if expect.nk_pem is not None:
        pcr16 = check_pcr16(check.bank, pcrs, expect.nk_pem)
        if pcr16 is not None:
            fails.append(pcr16)
    fails.extend(check_policy_pcrs(expect.tpm_policy, pcrs))
    if expect.measured_boot is not None and check.valid:
        fails.extend(expect.measured_boot(evidence.mb_log or b"", pcrs, check.bank,
                                          evaluate_policy=expect.evaluate_boot_policy))
    if IMA_PCR not in pcrs:
        return Verdict(fails, check, PCR10_NOT_QUOTED)
    if expect.ima is None or not check.valid:
        return Verdict(fails, check, PCR10_NOT_CHECKED)  # unverified, never "passed"
    ima_fails, next_entry = expect.ima(evidence.ima_list, evidence.ima_entry, pcrs, check.bank)
    fails.extend(ima_fails)
    return Verdict(fails, check, PCR10_CHECKED, next_entry)
