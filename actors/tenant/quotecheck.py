"""The tenant's identity-quote check (add, step 4): the agent's quote verifies with the AK the
registrar holds, over the tenant's nonce, with accepted algorithms, and PCR 16 binds the NK it sent.

The verdict is protocol.evidence.verify's; this module only turns it into the tenant's
:class:`~actors.tenant.errors.VerificationFailed` (exit code 4), the quote's own failures first.
No clock check: the tenant has no earlier quote, and the verifier checks the clock anyway.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from keytrio.actors.tenant.errors import VerificationFailed
from keytrio.protocol.evidence import Expectations, verify
from keytrio.protocol.quote_check import INVALID_ENC_ALG, INVALID_PCR_16, MISSING_PCR_16, PCR_16
from keytrio.protocol.wire import IdentityQuote, ReplyError

_WHAT = "identity quote"


def check_identity_quote(
    reply: object,
    *,
    aik_tpm: str,
    nonce: str,
    hash_algs: Iterable[str],
    enc_algs: Iterable[str],
    sign_algs: Iterable[str],
) -> IdentityQuote:
    """The agent's ``quotes/identity`` results, checked; VerificationFailed says what does not hold."""
    try:
        answer = IdentityQuote.decode(reply)
    except ReplyError as exc:
        raise VerificationFailed(_WHAT, str(exc)) from None
    try:
        ak = base64.b64decode(aik_tpm, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationFailed(_WHAT, "the registrar's aik_tpm is not base64") from exc
    expect = Expectations(
        ak=ak,
        nonce=nonce,
        accepted_hash_algs=tuple(hash_algs),
        accepted_sign_algs=tuple(sign_algs),
        accepted_enc_algs=tuple(enc_algs),
        required_pcrs=(PCR_16,),
        check_clock=False,
        nk_pem=answer.pubkey,
    )
    verdict = verify(expect, answer.evidence())
    if verdict.quote_failures:
        fails = verdict.quote_failures
        checks = ", ".join(str(f.context.get("check", f.event_id)) for f in fails)
        raise VerificationFailed(_WHAT, f"does not verify with the registered AK ({checks})",
                                 failures=[f.event_id for f in fails])
    ids = [f.event_id for f in verdict.failures]
    if INVALID_ENC_ALG in ids:
        raise VerificationFailed(_WHAT, f"encryption algorithm {answer.enc_alg} is not accepted")
    binding = [i for i in ids if i in (INVALID_PCR_16, MISSING_PCR_16)]
    if binding:
        raise VerificationFailed(_WHAT, "PCR 16 does not bind the agent's NK", failures=binding[:1])
    return answer
