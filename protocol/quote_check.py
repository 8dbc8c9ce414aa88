"""Quote verification with typed failures.

Failure event ids (``component.event``, as upstream Keylime 7.14.3 names them):

- ``qoute_validation.quote_validation`` (sic: upstream's component is spelled "qoute") for every
  quote-level failure: a quote that does not decode, algorithms not matching each other or the
  AK, bad signature, nonce mismatch, pcrSelect / pcrDigest mismatch, and the clock checks
  (upstream reports clock failures under the same id); where upstream names the same failure
  otherwise, its id: ``qoute_validation.invalid_quote`` (a quote string upstream cannot even split
  and base64-decode, an AK that does not load), ``qoute_validation.invalid_hash_alg`` /
  ``invalid_sign_alg`` (algorithm unknown or not accepted by the agent's record). ``context["check"]`` says which check failed, one of
  :data:`CHECKS`; ``context["message"]`` says it in words. These failures are irrecoverable and
  carry the highest severity, as upstream forces for irrecoverable events.
- ``pcr_validation.invalid_pcr_16`` / ``pcr_validation.missing_pcr_16``: PCR 16 does not bind the
  NK, or is not in the quote (:func:`check_pcr16`).
- ``pcr_validation.missing_pcrs``: PCRs the caller requires are not in the quote.

A quote whose signature, nonce or PCR digest does not verify is never reported valid.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from tpm2_pytss.types import TPM2B_PUBLIC

from keytrio.protocol import tpm2
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.quote import (
    ALG_ECDSA,
    ALG_RSAPSS,
    ALG_RSASSA,
    ClockInfo,
    ParsedQuote,
    parse_quote,
)

QUOTE_VALIDATION = "qoute_validation.quote_validation"
#: upstream's id when its quote parsing raises before any check (not 'r'-prefixed, fewer than 3
#: parts, a part that does not base64-decode) or the AK does not load
INVALID_QUOTE = "qoute_validation.invalid_quote"
#: upstream's ids for a claimed algorithm it does not know or the agent's record does not accept
INVALID_HASH_ALG = "qoute_validation.invalid_hash_alg"
INVALID_SIGN_ALG = "qoute_validation.invalid_sign_alg"
INVALID_ENC_ALG = "qoute_validation.invalid_enc_alg"
INVALID_PCR_16 = "pcr_validation.invalid_pcr_16"
MISSING_PCR_16 = "pcr_validation.missing_pcr_16"
MISSING_PCRS = "pcr_validation.missing_pcrs"

# values of context["check"] on QUOTE_VALIDATION failures
CHECK_DECODE = "decode"  # the quote string does not decode
CHECK_AK = "ak"  # the AK public does not decode or is not a usable key
CHECK_ALGORITHM = "algorithm"  # hash/sign algorithm not accepted or not the AK's
CHECK_SIGNATURE = "signature"
CHECK_NONCE = "nonce"
CHECK_PCR_SELECT = "pcr_select"  # attest's pcrSelect differs from the pcr blob's selection / bank
CHECK_PCR_DIGEST = "pcr_digest"
CHECK_CLOCK = "clock"
CHECKS = (
    CHECK_DECODE,
    CHECK_AK,
    CHECK_ALGORITHM,
    CHECK_SIGNATURE,
    CHECK_NONCE,
    CHECK_PCR_SELECT,
    CHECK_PCR_DIGEST,
    CHECK_CLOCK,
)

PCR_16 = 16


@dataclass
class QuoteCheck:
    """Result of :func:`check_quote`: valid iff no failure was found."""

    failures: list[Failure] = field(default_factory=list)
    pcrs: dict[int, bytes] = field(default_factory=dict)
    clock: ClockInfo | None = None
    bank: str | None = None
    quote: ParsedQuote | None = None

    @property
    def valid(self) -> bool:
        return not self.failures

    def checks_failed(self) -> list[str]:
        """The ``context["check"]`` of each quote-validation failure (handy in logs and tests)."""
        return [f.context.get("check", f.event_id) for f in self.failures]


def _quote_failure(check: str, message: str, *, event_id: str = QUOTE_VALIDATION, **extra: object) -> Failure:
    ctx: dict[str, object] = {"message": message, "check": check}
    ctx.update(extra)
    return Failure(event_id, ctx, Severity.EMERGENCY, recoverable=False)


def _unparsable_upstream(text: object) -> bool:
    """True where upstream's quote reader raises before checking anything (it then reports
    ``invalid_quote``): not a string starting with 'r', fewer than 3 ':'-parts, or one of the
    first three parts not base64 even for its lenient decoder."""
    if not isinstance(text, str) or not text.startswith("r"):
        return True
    parts = text[1:].split(":")
    if len(parts) < 3:
        return True
    for part in parts[:3]:
        try:
            base64.b64decode(part)
        except (binascii.Error, ValueError):
            return True
    return False


def nonce_matches(extra_data: bytes, nonce: str, *, allow_base64: bool = False) -> bool:
    """The quote's extraData against the expected nonce: its raw UTF-8 bytes, or (``allow_base64``,
    as upstream's checkquote does for ``/verify/*``) the bytes its base64 text decodes to."""
    try:
        if extra_data == nonce.encode("utf-8"):
            return True
    except (UnicodeEncodeError, AttributeError):
        return False
    if not allow_base64:
        return False
    try:
        # upstream's decoder is the lenient one (characters outside the alphabet are skipped)
        return extra_data == base64.b64decode(nonce)
    except (binascii.Error, ValueError):
        return False


_PKCS1V15 = padding.PKCS1v15()  # stateless: one for every verify


def _verify_signature(ak: tpm2.AkKey, sig_alg: int, bank_hash: str, q: ParsedQuote) -> str | None:
    """None if the signature over the TPMS_ATTEST bytes verifies, else why not."""
    h = tpm2.crypto_hash(bank_hash)
    digest = tpm2.digest(bank_hash, q.attest_raw)
    try:
        if sig_alg in (ALG_RSASSA, ALG_RSAPSS):
            if not isinstance(ak.key, rsa.RSAPublicKey):
                return "RSA signature but the AK is not an RSA key"
            if sig_alg == ALG_RSASSA:
                pad: padding.AsymmetricPadding = _PKCS1V15
            else:
                # the TPM uses the largest salt that fits; AUTO recovers any salt length
                pad = padding.PSS(padding.MGF1(h), padding.PSS.AUTO)
            ak.key.verify(q.sig.sig, digest, pad, Prehashed(h))
        elif sig_alg == ALG_ECDSA:
            if not isinstance(ak.key, ec.EllipticCurvePublicKey):
                return "ECDSA signature but the AK is not an ECC key"
            der = encode_dss_signature(int.from_bytes(q.sig.r, "big"), int.from_bytes(q.sig.s, "big"))
            ak.key.verify(der, digest, ec.ECDSA(Prehashed(h)))
        else:
            return f"cannot verify signature scheme {tpm2.SIGN_NAMES.get(sig_alg, hex(sig_alg))}"
    except InvalidSignature:
        return "signature does not verify with the AK"
    return None


#: the public name of the one signature check, for callers that check a quote in one pass (the
#: verifier's steady-state poll); the function keeps its name so profiles still find it
signature_error = _verify_signature


def _as_ak(ak_public: TPM2B_PUBLIC | bytes | tpm2.AkKey) -> tpm2.AkKey:
    if isinstance(ak_public, tpm2.AkKey):
        return ak_public
    return tpm2.ak_key(ak_public)


def check_clock(current: ClockInfo, previous: ClockInfo | None) -> str | None:
    """None if the TPM clock info is acceptable after ``previous``, else why not.

    safe must be 1; resetCount never decreases; restartCount never decreases while resetCount
    stays (a TPM reset restarts it); clock strictly increases (with safe == 1 the TPM promises it
    never reported a larger value before).
    """
    if current.safe != 1:
        return "clock safe flag is not set"
    if previous is None:
        return None
    if current.reset_count < previous.reset_count:
        return "resetCount decreased between two quotes"
    if current.reset_count == previous.reset_count and current.restart_count < previous.restart_count:
        return "restartCount decreased between two quotes"
    if current.clock <= previous.clock:
        return "clock did not increase between two quotes"
    return None


def check_quote(
    quote: ParsedQuote | str,
    *,
    ak_public: TPM2B_PUBLIC | bytes | tpm2.AkKey,
    nonce: str,
    hash_alg: str,
    accepted_hash_algs: Iterable[str] | None = None,
    accepted_sign_algs: Iterable[str] | None = None,
    previous_clock: ClockInfo | None = None,
    check_clock_info: bool = True,
    required_pcrs: Iterable[int] | None = None,
    nonce_base64: bool = False,
) -> QuoteCheck:
    """Verify a quote against the AK, the nonce and the claimed hash algorithm.

    ``hash_alg`` is the agent's claimed algorithm: it must be the PCR bank, the signature hash and
    (when given) in ``accepted_hash_algs``. ``previous_clock`` is the last accepted quote's clock
    info of this agent; ``check_clock_info=False`` skips the clock checks (``/verify/*``).
    Pass an :class:`protocol.tpm2.AkKey` as ``ak_public`` to avoid re-parsing the AK every poll.
    ``nonce_base64`` also accepts a nonce given as base64 of the quote's extraData (``/verify/*``).
    """
    result = QuoteCheck()
    fails = result.failures

    if not isinstance(quote, ParsedQuote):
        try:
            quote = parse_quote(quote)
        except ProtocolError as exc:
            event_id = INVALID_QUOTE if _unparsable_upstream(quote) else QUOTE_VALIDATION
            fails.append(_quote_failure(CHECK_DECODE, "quote does not decode", error=str(exc), event_id=event_id))
            return result
    result.quote = quote
    result.pcrs = dict(quote.pcrs)
    result.bank = quote.bank
    result.clock = quote.info.clock

    try:
        ak = _as_ak(ak_public)
    except ProtocolError as exc:
        fails.append(_quote_failure(CHECK_AK, "AK public key is unusable", error=str(exc), event_id=INVALID_QUOTE))
        return result

    sig_hash = tpm2.HASH_NAMES.get(quote.sig.hash_alg)
    fails += _algorithm_failures(quote, ak, hash_alg, accepted_hash_algs, accepted_sign_algs)
    fails += _signature_failures(quote, ak, sig_hash)
    # -- nonce: extraData carries the nonce's raw bytes (pull mode), or what its base64 decodes to
    if not nonce_matches(quote.info.extra_data, nonce, allow_base64=nonce_base64):
        fails.append(_quote_failure(CHECK_NONCE, "the quote's nonce differs from the expected nonce"))
    fails += _selection_failures(quote, hash_alg)
    # -- PCR digest: H_sighash(values in ascending PCR order), as TPM2_Quote computes it
    expected = tpm2.digest(sig_hash or quote.bank, b"".join(quote.pcrs[p] for p in sorted(quote.pcrs)))
    if expected != quote.info.pcr_digest:
        fails.append(_quote_failure(CHECK_PCR_DIGEST, "pcrDigest does not match the PCR values sent"))
    if check_clock_info:
        fails += _clock_failures(quote.info.clock, previous_clock)
    if required_pcrs is not None:
        missing = sorted(set(required_pcrs) - set(quote.pcrs))
        if missing:
            fails.append(
                Failure(
                    MISSING_PCRS, {"context": "PCRs are missing in quote", "data": missing}, recoverable=True
                )
            )
    return result


def _algorithm_failures(
    quote: ParsedQuote,
    ak: tpm2.AkKey,
    hash_alg: str,
    accepted_hash_algs: Iterable[str] | None,
    accepted_sign_algs: Iterable[str] | None,
) -> list[Failure]:
    """Claimed hash == signature hash == bank, all accepted, and the AK's own scheme."""
    fails: list[Failure] = []
    sig = quote.sig
    sig_hash = tpm2.HASH_NAMES.get(sig.hash_alg)
    sig_name = tpm2.SIGN_NAMES.get(sig.sig_alg, f"{sig.sig_alg:#06x}")
    if hash_alg not in tpm2.HASH_ALGS:
        fails.append(_quote_failure(CHECK_ALGORITHM, f"unsupported hash_alg {hash_alg!r}", event_id=INVALID_HASH_ALG))
    elif accepted_hash_algs is not None and hash_alg not in set(accepted_hash_algs):
        fails.append(_quote_failure(CHECK_ALGORITHM, f"hash_alg {hash_alg} is not accepted", event_id=INVALID_HASH_ALG))
    if sig_hash is None:
        fails.append(_quote_failure(CHECK_ALGORITHM, f"unsupported signature hash {sig.hash_alg:#06x}"))
    elif sig_hash != hash_alg:
        fails.append(_quote_failure(CHECK_ALGORITHM, f"quote signed with {sig_hash}, expected {hash_alg}"))
    if accepted_sign_algs is not None and sig_name not in set(accepted_sign_algs):
        fails.append(_quote_failure(CHECK_ALGORITHM, f"signing algorithm {sig_name} is not accepted",
                                    event_id=INVALID_SIGN_ALG))
    if sig_name != ak.sign_alg or sig_hash != ak.hash_alg:
        fails.append(
            _quote_failure(
                CHECK_ALGORITHM,
                f"quote signed with {sig_name}/{sig_hash} but the AK's scheme is {ak.sign_alg}/{ak.hash_alg}",
            )
        )
    return fails


def _signature_failures(quote: ParsedQuote, ak: tpm2.AkKey, sig_hash: str | None) -> list[Failure]:
    """Verified with the hash the signature names (the TPM hashes with its scheme's hash)."""
    if sig_hash is None:
        return [_quote_failure(CHECK_SIGNATURE, "signature hash unsupported, cannot verify")]
    why = _verify_signature(ak, quote.sig.sig_alg, sig_hash, quote)
    return [] if why is None else [_quote_failure(CHECK_SIGNATURE, why)]


def _selection_failures(quote: ParsedQuote, hash_alg: str) -> list[Failure]:
    """The attest must select exactly the blob's bank and PCRs."""
    fails: list[Failure] = []
    selected = sorted(quote.pcrs)
    sel = quote.info.pcr_select
    if quote.bank != hash_alg:
        fails.append(_quote_failure(CHECK_PCR_SELECT, f"PCR bank is {quote.bank}, expected {hash_alg}"))
    if len(sel) != 1 or sel[0].bank != quote.bank or list(sel[0].pcrs) != selected:
        fails.append(
            _quote_failure(
                CHECK_PCR_SELECT,
                "the quote's pcrSelect differs from the PCR values sent",
                quoted=[[s.hash_alg, list(s.pcrs)] for s in sel],
                sent=[tpm2.HASH_ALGS[quote.bank], selected],
            )
        )
    return fails


def _clock_failures(current: ClockInfo, previous: ClockInfo | None) -> list[Failure]:
    why = check_clock(current, previous)
    if why is None:
        return []
    return [
        _quote_failure(
            CHECK_CLOCK, why, current=current.to_json(), previous=previous.to_json() if previous else None
        )
    ]


def check_pcr16(bank: str, pcrs: dict[int, bytes], nk_pem: str) -> Failure | None:
    """None if PCR 16 holds H(0...0 || H(NK PEM)) in ``bank``, else the failure."""
    if PCR_16 not in pcrs:
        return Failure(
            MISSING_PCR_16,
            {"message": f"Data PCR {PCR_16} is missing in quote, but is required"},
            recoverable=True,
        )
    expected = tpm2.pcr16_binding_value(bank, nk_pem)
    if pcrs[PCR_16] != expected:
        return Failure(
            INVALID_PCR_16,
            {"got": pcrs[PCR_16].hex(), "expected": expected.hex()},
            recoverable=True,
        )
    return None
