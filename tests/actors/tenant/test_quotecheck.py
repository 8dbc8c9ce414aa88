"""The tenant's identity-quote check (actors.tenant.quotecheck) on quotes built in software: each
way an identity quote can fail is its own VerificationFailed, the quote's own failures first."""

from __future__ import annotations

import base64

import pytest

from keytrio.actors.tenant.errors import VerificationFailed
from keytrio.actors.tenant.quotecheck import check_identity_quote
from keytrio.protocol import tpm2
from keytrio.protocol.wire import IdentityQuote
from tests.protocol.quote_support import make_quote, pcr_values
from tests.protocol.tpm2_support import ak_public, key_pem, private_key

NONCE = "abcdefghij0123456789"
NK = key_pem(private_key("rsa2")).decode()
AIK = base64.b64encode(ak_public("rsa").marshal()).decode()


def _reply(pcrs=(16,), nk: str = NK, enc_alg: str = "rsa") -> dict:
    values = pcr_values("sha256", list(pcrs))
    if 16 in values:
        values[16] = tpm2.pcr16_binding_value("sha256", nk)
    return IdentityQuote(make_quote("rsa", "sha256", values), "sha256", enc_alg, "rsassa", NK, boottime=1).encode()


def _check(reply: object, aik: str = AIK, enc_algs=("rsa", "ecc")) -> IdentityQuote:
    return check_identity_quote(reply, aik_tpm=aik, nonce=NONCE, hash_algs=["sha256"], enc_algs=list(enc_algs),
                                sign_algs=["rsassa"])


def test_good_identity_quote():
    q = _check(_reply())
    assert (q.hash_alg, q.enc_alg, q.sign_alg, q.pubkey) == ("sha256", "rsa", "rsassa", NK)


@pytest.mark.parametrize(
    ("reply", "aik", "enc_algs", "message", "failures"),
    [
        ({"quote": "r"}, AIK, ("rsa",), "reply lacks quote/hash_alg/enc_alg/sign_alg/pubkey", None),
        (None, "not base64!", ("rsa",), "the registrar's aik_tpm is not base64", None),
        (None, base64.b64encode(ak_public("rsa2").marshal()).decode(), ("rsa",),
         r"does not verify with the registered AK \(signature\)", ["qoute_validation.quote_validation"]),
        ("no16", AIK, ("rsa",), r"does not verify with the registered AK \(pcr_validation.missing_pcrs\)",
         ["pcr_validation.missing_pcrs"]),
        (None, AIK, ("ecc",), "encryption algorithm rsa is not accepted", None),
        ("othernk", AIK, ("rsa",), "PCR 16 does not bind the agent's NK", ["pcr_validation.invalid_pcr_16"]),
    ],
)
def test_identity_quote_refused(reply, aik, enc_algs, message, failures):
    if reply is None:
        reply = _reply()
    elif reply == "no16":
        reply = _reply(pcrs=(0, 1))
    elif reply == "othernk":
        reply = _reply(nk=key_pem(private_key("rsa")).decode())
    with pytest.raises(VerificationFailed, match=message) as exc:
        _check(reply, aik, enc_algs)
    assert exc.value.what == "identity quote"
    assert exc.value.context.get("failures") == failures
