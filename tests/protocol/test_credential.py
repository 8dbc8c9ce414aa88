"""protocol.credential: MakeCredential blobs (opened here with the EK private key), credential, auth tag."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

# tpm2-pytss' own KDFs: an implementation independent of protocol.credential's
from tpm2_pytss.internal.crypto import _kdfa, kdfe
from tpm2_pytss.types import TPM2B_DIGEST
from tpm2_pytss.utils import tools_to_credential

from keytrio.protocol import credential, tpm2
from keytrio.protocol.errors import DecodeError, ValidationError
from tests.protocol.tpm2_support import ak_public, ek_public, private_key


def activate(ek_kind: str, blob: bytes, ak_name: bytes) -> bytes:
    """ActivateCredential in software with the EK's private key (TPM 2.0 Part 1, 24)."""
    ek = ek_public(ek_kind).publicArea
    name_alg = ek.nameAlg
    hname = tpm2.HASH_NAMES[int(name_alg)]
    h = tpm2.crypto_hash(hname)
    id_object, secret = credential.parse_credential_blob(blob)
    enc_seed = bytes(secret)
    key = private_key(ek_kind)
    if isinstance(key, rsa.RSAPrivateKey):
        seed = key.decrypt(enc_seed, padding.OAEP(padding.MGF1(h), h, b"IDENTITY\x00"))
    else:
        xlen = int.from_bytes(enc_seed[:2], "big")
        ex = enc_seed[2 : 2 + xlen]
        ey = enc_seed[4 + xlen :]
        peer = ec.EllipticCurvePublicNumbers(
            int.from_bytes(ex, "big"), int.from_bytes(ey, "big"), key.curve
        ).public_key()
        z = key.exchange(ec.ECDH(), peer)
        kx = key.public_key().public_numbers().x.to_bytes(len(ex), "big")
        seed = kdfe(name_alg, z, b"IDENTITY\x00", ex, kx, h.digest_size * 8)
    body = bytes(id_object)
    hlen = int.from_bytes(body[:2], "big")
    outer, enc_identity = body[2 : 2 + hlen], body[2 + hlen :]
    mac = crypto_hmac.HMAC(_kdfa(name_alg, seed, b"INTEGRITY", b"", b"", h.digest_size * 8), h)
    mac.update(enc_identity + ak_name)
    mac.verify(outer)  # raises InvalidSignature for a wrong AK name / EK
    bits = int(ek.parameters.asymDetail.symmetric.keyBits.sym)
    sym = _kdfa(name_alg, seed, b"STORAGE", ak_name, b"", bits)
    dec = Cipher(algorithms.AES(sym), CFB(bytes(16))).decryptor()
    plain = dec.update(enc_identity) + dec.finalize()
    cred, used = TPM2B_DIGEST.unmarshal(plain)
    assert used == len(plain)
    return bytes(cred)


@pytest.mark.parametrize("ek_kind", ["rsa", "p256", "p384"])
def test_make_credential_opens_with_the_ek(ek_kind):
    cred = credential.new_credential(bytes(range(32)))
    name = tpm2.object_name(ak_public("rsa"))
    blob = credential.make_credential_blob(ek_public(ek_kind), name, cred)
    assert blob[:8] == bytes.fromhex("badcc0de00000001")
    assert activate(ek_kind, blob, name) == cred
    # tpm2-pytss reads the same format
    id_object, secret = tools_to_credential(blob)
    assert (bytes(id_object), bytes(secret)) == tuple(
        bytes(x) for x in credential.parse_credential_blob(blob)
    )
    # marshalled EK bytes work the same
    assert (
        activate(ek_kind, credential.make_credential_blob(ek_public(ek_kind).marshal(), name, cred), name)
        == cred
    )


@pytest.mark.parametrize("ek_kind", ["rsa", "p256"])
def test_credential_is_bound_to_the_ak_name(ek_kind):
    name = tpm2.object_name(ak_public("rsa"))
    other = tpm2.object_name(ak_public("p256"))
    blob = credential.make_credential_blob(ek_public(ek_kind), name, b"x" * 32)
    with pytest.raises(InvalidSignature):
        activate(ek_kind, blob, other)


def test_randomness_comes_from_rng():
    name = tpm2.object_name(ak_public("rsa"))

    def rng_from(seed):
        r = random.Random(seed)
        return lambda n: r.randbytes(n)

    # ECC: fully determined by rng
    a = credential.make_credential_blob(ek_public("p256"), name, b"c" * 32, rng=rng_from(1))
    b = credential.make_credential_blob(ek_public("p256"), name, b"c" * 32, rng=rng_from(1))
    c = credential.make_credential_blob(ek_public("p256"), name, b"c" * 32, rng=rng_from(2))
    assert a == b != c
    # RSA: the id object is determined by the seed; OAEP padding adds its own randomness
    ra = credential.make_credential(ek_public("rsa"), name, b"c" * 32, rng=rng_from(1))
    rb = credential.make_credential(ek_public("rsa"), name, b"c" * 32, rng=rng_from(1))
    assert ra[0] == rb[0] and ra[1] != rb[1]


def test_make_credential_rejects_bad_input():
    name = tpm2.object_name(ak_public("rsa"))
    with pytest.raises(ValidationError):
        credential.make_credential_blob(ek_public("rsa"), name, b"x" * 33)  # > sha256 digest size
    with pytest.raises(ValidationError):
        credential.make_credential_blob(ek_public("rsa"), name, b"")
    with pytest.raises(ValidationError):
        credential.make_credential_blob(ek_public("rsa"), b"", b"x")
    with pytest.raises(ValidationError):
        credential.make_credential_blob(ak_public("rsa"), name, b"x")  # a signing key has no AES
    with pytest.raises(DecodeError):
        credential.make_credential_blob(b"\x00\x01", name, b"x")
    # P-384 EK with sha384 nameAlg takes up to 48 bytes
    assert credential.make_credential_blob(ek_public("p384"), name, b"y" * 48)


def test_parse_credential_blob_rejects_garbage():
    blob = credential.make_credential_blob(ek_public("rsa"), tpm2.object_name(ak_public("rsa")), b"z" * 32)
    for cut in range(0, len(blob), 7):
        with pytest.raises(DecodeError):
            credential.parse_credential_blob(blob[:cut])
    with pytest.raises(DecodeError):
        credential.parse_credential_blob(blob + b"\x00")
    with pytest.raises(DecodeError):
        credential.parse_credential_blob(b"\xba\xdc\xc0\xdf" + blob[4:])
    with pytest.raises(DecodeError):
        credential.parse_credential_blob(blob[:4] + b"\x00\x00\x00\x02" + blob[8:])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_credential_blob_random_bytes(raw):
    for data in (raw, bytes.fromhex("badcc0de00000001") + raw):
        try:
            credential.parse_credential_blob(data)
        except DecodeError:
            pass


def test_new_credential():
    a = credential.new_credential(bytes(32))
    b = credential.new_credential(bytes(31) + b"\x01")
    c = credential.new_credential(b"\xff" * 40)
    for cred in (a, b, c):
        assert len(cred) == 32 and cred.isascii() and cred.decode().isalnum()
    assert len({a, b, c}) == 3
    assert credential.new_credential(bytes(range(32))) == credential.new_credential(bytes(range(32)))
    with pytest.raises(ValidationError):
        credential.new_credential(b"short")


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_new_credential_is_injective_enough(x, y):
    if x != y:
        assert credential.new_credential(x) != credential.new_credential(y)


def test_activation_auth_tag():
    cred = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    agent = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
    expected = hmac.new(base64.b64encode(cred), agent.encode(), hashlib.sha384).hexdigest()
    tag = credential.activation_auth_tag(cred, agent)
    assert tag == expected and len(tag) == 96
    assert credential.check_auth_tag(cred, agent, tag)
    assert credential.check_auth_tag(cred, agent, tag.upper())
    assert not credential.check_auth_tag(cred, agent, tag[:-1] + ("0" if tag[-1] != "0" else "1"))
    assert not credential.check_auth_tag(cred, agent + "x", tag)
    assert not credential.check_auth_tag(b"other", agent, tag)
    assert not credential.check_auth_tag(cred, agent, "")
    assert not credential.check_auth_tag(cred, agent, "é" * 96)
    assert not credential.check_auth_tag(cred, agent, None)  # type: ignore[arg-type]
