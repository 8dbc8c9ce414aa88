"""protocol.pop: the TPM2_Certify proof of possession of the AK (push sessions)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss.types import TPMS_ATTEST

from keytrio.protocol import pop, tpm2
from keytrio.protocol.errors import DecodeError
from tests.protocol.quote_support import make_pop, sign_attest
from tests.protocol.tpm2_support import ak_public

# --- builders shared with the push tests (not tests) -------------------------------------------------


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_valid_proof(kind):
    challenge = pop.new_challenge()
    message, signature = make_pop(challenge, kind)
    attest = pop.verify_pop(message, signature, ak_public=ak_public(kind), challenge=challenge)
    assert attest.extra_data == challenge
    assert attest.name == tpm2.object_name(ak_public(kind))
    ak = tpm2.ak_key(ak_public(kind))
    assert pop.verify_pop(message, signature, ak_public=ak, challenge=challenge) == attest


def test_encoder_matches_tpm2_pytss():
    name = tpm2.object_name(ak_public("rsa"))
    raw = pop.encode_certify(extra_data=b"c" * 16, name=name, clock=(7, 2, 1, 1), firmware_version=9)
    parsed = TPMS_ATTEST.unmarshal(raw)[0]
    assert bytes(parsed.extraData) == b"c" * 16
    assert bytes(parsed.attested.certify.name) == name
    assert int(parsed.clockInfo.resetCount) == 2 and int(parsed.firmwareVersion) == 9
    assert pop.decode_certify(raw).clock.clock == 7


def test_challenges_are_fresh():
    seen = {pop.new_challenge() for _ in range(100)}
    assert len(seen) == 100 and all(len(c) == pop.CHALLENGE_LEN for c in seen)


def _refused(message, signature, challenge, kind="rsa", match=None):
    with pytest.raises(pop.PopError, match=match):
        pop.verify_pop(message, signature, ak_public=ak_public(kind), challenge=challenge)


def test_forged_signature_is_refused():
    challenge = pop.new_challenge()
    message, signature = make_pop(challenge)
    forged = bytearray(signature)
    forged[-1] ^= 1  # one bit of the RSA signature (upstream accepts this in quotes)
    _refused(message, bytes(forged), challenge, match="does not verify")


def test_another_agents_key_is_refused():
    challenge = pop.new_challenge()
    message, signature = make_pop(challenge, "rsa2")  # agent B certifies its own AK
    _refused(message, signature, challenge, "rsa", match="not the enrolled AK")
    # B's signature over an attest naming A's AK: the signature does not verify with A's key
    message, signature = make_pop(challenge, "rsa2", certified="rsa")
    _refused(message, signature, challenge, "rsa", match="does not verify")


def test_wrong_or_old_challenge_is_refused():
    message, signature = make_pop(b"x" * 16)
    _refused(message, signature, b"y" * 16, match="challenge")
    _refused(message, signature, b"", match="challenge")


def test_tampered_attest_is_refused():
    challenge = pop.new_challenge()
    message, signature = make_pop(challenge)
    tampered = bytearray(message)
    tampered[-1] ^= 1
    _refused(bytes(tampered), signature, challenge)


def test_not_a_certify_or_not_tpm_generated():
    challenge = pop.new_challenge()
    message, _ = make_pop(challenge)
    quote_type = message[:4] + b"\x80\x18" + message[6:]
    _refused(quote_type, sign_attest(quote_type), challenge, match="TPM_ST_ATTEST_CERTIFY")
    outside = b"\x00\x00\x00\x00" + message[4:]
    _refused(outside, sign_attest(outside), challenge, match="magic")
    _refused(message + b"\x00", sign_attest(message + b"\x00"), challenge, match="trailing")


def test_scheme_must_be_the_aks():
    challenge = pop.new_challenge()
    message, _ = make_pop(challenge)
    pss = sign_attest(message, "rsa", "sha256", scheme="rsapss")
    _refused(message, pss, challenge, match="scheme")
    sha384 = sign_attest(message, "rsa", "sha384")
    _refused(message, sha384, challenge, match="scheme")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_hostile_bytes_only_raise_pop_error(message, signature):
    with pytest.raises(pop.PopError):
        pop.verify_pop(message, signature, ak_public=ak_public("rsa"), challenge=b"c" * 16)


def test_decode_errors():
    with pytest.raises(DecodeError):
        pop.decode_certify(b"")
    with pytest.raises(DecodeError):
        pop.decode_certify(pop.encode_certify(extra_data=b"x" * 67, name=b"n"))
