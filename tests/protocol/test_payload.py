"""Payload crypto: K/U/V, AES-256-GCM payloads, HMAC proofs, RSA-OAEP key halves."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import payload
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.payload import PayloadError


@pytest.fixture(scope="module")
def nk() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# --- K / U / V -------------------------------------------------------------------------------


def test_key_halves_xor() -> None:
    r = bytes(range(64))
    halves = payload.new_key_halves(r)
    assert halves.k == r[:32] and halves.u == r[32:]
    assert halves.v == bytes(a ^ b for a, b in zip(r[:32], r[32:], strict=True))
    assert payload.combine(halves.u, halves.v) == halves.k
    assert payload.combine(halves.v, halves.u) == halves.k  # arrival order does not matter
    assert payload.split_key(halves.k, halves.u) == halves.v


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_split_combine_round_trip(k: bytes, u: bytes) -> None:
    v = payload.split_key(k, u)
    assert payload.combine(u, v) == k


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32, None])
def test_key_lengths_checked(bad: object) -> None:
    with pytest.raises(PayloadError):
        payload.combine(bad, b"x" * 32)  # type: ignore[arg-type]
    with pytest.raises(PayloadError):
        payload.encrypt_payload(bad, b"p", b"i" * 16)  # type: ignore[arg-type]
    with pytest.raises(PayloadError):
        payload.new_key_halves(b"r" * 63)


# --- AES-GCM payload ---------------------------------------------------------------------------


def test_payload_round_trip_and_layout() -> None:
    k, iv = os.urandom(32), os.urandom(16)
    blob = payload.encrypt_payload(k, b"secret zip bytes", iv)
    assert blob[:16] == iv
    assert len(blob) == 16 + len(b"secret zip bytes") + 16
    assert payload.decrypt_payload(k, blob) == b"secret zip bytes"
    assert payload.decrypt_payload(k, payload.encrypt_payload(k, b"", iv)) == b""


def test_payload_wrong_key() -> None:
    k = os.urandom(32)
    blob = payload.encrypt_payload(k, b"data", os.urandom(16))
    other = bytes([k[0] ^ 1]) + k[1:]
    with pytest.raises(PayloadError):
        payload.decrypt_payload(other, blob)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_payload_tamper_any_bit(plaintext: bytes, data: st.DataObject) -> None:
    k = b"K" * 32
    blob = bytearray(payload.encrypt_payload(k, plaintext, b"I" * 16))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(PayloadError):
        payload.decrypt_payload(k, bytes(blob))


@given(st.binary(max_size=100), st.integers(0, 200))
def test_payload_truncation(plaintext: bytes, cut: int) -> None:
    k = b"K" * 32
    blob = payload.encrypt_payload(k, plaintext, b"I" * 16)
    cut = min(cut, len(blob) - 1)
    with pytest.raises(PayloadError):
        payload.decrypt_payload(k, blob[:cut])


def test_payload_iv_must_be_16() -> None:
    with pytest.raises(PayloadError):
        payload.encrypt_payload(b"K" * 32, b"x", b"i" * 12)


# --- HMAC ----------------------------------------------------------------------------------------


def _ref_hmac(key: bytes, msg: bytes) -> str:
    h = c_hmac.HMAC(key, hashes.SHA384())
    h.update(msg)
    return h.finalize().hex()


def test_auth_tag_is_hmac_sha384_hex() -> None:
    k = bytes(range(32))
    agent = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
    tag = payload.auth_tag(k, agent)
    assert tag == _ref_hmac(k, agent.encode())
    assert len(tag) == 96
    assert payload.check_auth_tag(k, agent, tag)
    assert payload.check_auth_tag(k, agent, tag.upper())
    assert payload.verify_hmac(k, "abcDEF123") == _ref_hmac(k, b"abcDEF123")


@pytest.mark.parametrize("bad", ["", "00" * 48, "é" * 96, None, 5, ["x"], "\udc80"])
def test_check_auth_tag_rejects(bad: object) -> None:
    assert payload.check_auth_tag(b"k" * 32, "agent", bad) is False


def test_check_auth_tag_other_agent() -> None:
    k = b"k" * 32
    assert not payload.check_auth_tag(k, "agent-b", payload.auth_tag(k, "agent-a"))
    assert not payload.check_auth_tag(b"j" * 32, "agent-a", payload.auth_tag(k, "agent-a"))


# --- RSA-OAEP key halves -----------------------------------------------------------------------


def test_oaep_round_trip(nk: rsa.RSAPrivateKey) -> None:
    half = os.urandom(32)
    text = payload.encrypt_key_half(_pem(nk), half)
    assert payload.decrypt_key_half(nk, text) == half
    # Independently: it is OAEP with SHA-1 and MGF1-SHA-1, as upstream agents expect.
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    assert nk.decrypt(base64.b64decode(text), oaep) == half
    # ... and what a tenant built with those parameters decrypts here.
    other = base64.b64encode(nk.public_key().encrypt(half, oaep)).decode()
    assert payload.decrypt_key_half(nk, other) == half


def test_oaep_wrong_key_and_garbage(nk: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    text = payload.encrypt_key_half(_pem(other), os.urandom(32))
    with pytest.raises(PayloadError):
        payload.decrypt_key_half(nk, text)
    with pytest.raises(ValidationError):
        payload.decrypt_key_half(nk, "not base64!")
    with pytest.raises(ValidationError):
        payload.decrypt_key_half(nk, 12)
    with pytest.raises(PayloadError):
        payload.decrypt_key_half(nk, base64.b64encode(b"\x00" * 256).decode())
    # A correctly encrypted value that is not 32 bytes is not a key half.
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    short = base64.b64encode(nk.public_key().encrypt(b"x" * 16, oaep)).decode()
    with pytest.raises(PayloadError):
        payload.decrypt_key_half(nk, short)


def test_oaep_bad_public_keys() -> None:
    with pytest.raises(PayloadError):
        payload.encrypt_key_half("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", b"x" * 32)
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(PayloadError):
        payload.encrypt_key_half(ec_pem, b"x" * 32)


_NK_FOR_HYPOTHESIS = rsa.generate_private_key(public_exponent=65537, key_size=1024)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=400))
def test_decrypt_key_half_hostile_text(nk_text: str) -> None:
    key = _NK_FOR_HYPOTHESIS
    try:
        payload.decrypt_key_half(key, nk_text)
    except ProtocolError:
        pass


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_encrypt_key_half_hostile_pem(pem: str | bytes) -> None:
    prefix = "-----BEGIN PUBLIC KEY-----\n" if isinstance(pem, str) else b"-----BEGIN PUBLIC KEY-----\n"
    for candidate in (pem, prefix + pem):
        with pytest.raises(PayloadError):
            payload.encrypt_key_half(candidate, b"x" * 32)
