"""Payload crypto between tenant, verifier and agent (PROTOCOL.md "Agent", keys).

Keylime's bootstrap key K (32 bytes, AES-256) is split in two halves: the tenant sends U to the
agent and V to the verifier, which releases V only after a good quote; K = U xor V. Each half
travels RSA-OAEP(SHA-1, MGF1-SHA-1)-encrypted to the agent's NK. The agent proves it holds K with
HMAC-SHA384(K, agent id) ("auth_tag") and answers GET keys/verify with HMAC-SHA384(K, challenge).
An optional payload is AES-256-GCM under K, laid out iv16 || ciphertext || tag16.

Pure: randomness (key material, IVs) is always passed in by the caller.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import NamedTuple

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keytrio.protocol import validation
from keytrio.protocol.errors import ProtocolError

KEY_LEN = 32  # AES-256
IV_LEN = 16  # upstream uses a 16-byte GCM nonce (its AES block size constant), not the usual 12
TAG_LEN = 16


class PayloadError(ProtocolError):
    """A key half, key or payload is malformed, or does not decrypt/authenticate."""


class KeyHalves(NamedTuple):
    k: bytes
    u: bytes
    v: bytes


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _check_len(value: object, name: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != KEY_LEN:
        raise PayloadError(f"{name} must be {KEY_LEN} bytes")
    return bytes(value)


def split_key(k: bytes, u: bytes) -> bytes:
    """V for a given K and U (V = K xor U)."""
    return _xor(_check_len(k, "K"), _check_len(u, "U"))


def combine(u: bytes, v: bytes) -> bytes:
    """K from its two halves, in either order (xor commutes)."""
    return _xor(_check_len(u, "U"), _check_len(v, "V"))


def new_key_halves(random64: bytes) -> KeyHalves:
    """K, U and V from 64 caller-supplied random bytes (K = first 32, U = last 32)."""
    if not isinstance(random64, bytes | bytearray) or len(random64) != 2 * KEY_LEN:
        raise PayloadError(f"need {2 * KEY_LEN} random bytes")
    k, u = bytes(random64[:KEY_LEN]), bytes(random64[KEY_LEN:])
    return KeyHalves(k, u, _xor(k, u))


# --- AES-256-GCM payload -------------------------------------------------------------------------


def encrypt_payload(k: bytes, plaintext: bytes, iv: bytes) -> bytes:
    """iv16 || AES-256-GCM ciphertext || tag16 (no associated data), as upstream lays it out."""
    key = _check_len(k, "K")
    if not isinstance(iv, bytes | bytearray) or len(iv) != IV_LEN:
        raise PayloadError(f"IV must be {IV_LEN} bytes")
    return bytes(iv) + AESGCM(key).encrypt(bytes(iv), plaintext, None)


def decrypt_payload(k: bytes, blob: bytes) -> bytes:
    """Inverse of :func:`encrypt_payload`; PayloadError on a wrong key, tampering or truncation."""
    key = _check_len(k, "K")
    if not isinstance(blob, bytes | bytearray) or len(blob) < IV_LEN + TAG_LEN:
        raise PayloadError("payload too short")
    try:
        return AESGCM(key).decrypt(bytes(blob[:IV_LEN]), bytes(blob[IV_LEN:]), None)
    except InvalidTag as exc:
        raise PayloadError("payload does not authenticate under K") from exc


# --- HMAC proofs of K ----------------------------------------------------------------------------


def _hmac_hex(k: bytes, text: str) -> str:
    return hmac.new(_check_len(k, "K"), text.encode("utf-8"), hashlib.sha384).hexdigest()


def auth_tag(k: bytes, agent_id: str) -> str:
    """hex(HMAC-SHA384(K, agent_id)), sent with the U half."""
    return _hmac_hex(k, agent_id)


def check_auth_tag(k: bytes, agent_id: str, tag: object) -> bool:
    """Constant-time comparison of a received auth_tag (any hostile value just gives False)."""
    if not isinstance(tag, str):
        return False
    try:
        got = tag.lower().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(got, auth_tag(k, agent_id).encode("ascii"))


def verify_hmac(k: bytes, challenge: str) -> str:
    """hex(HMAC-SHA384(K, challenge)): the agent's answer to GET keys/verify."""
    return _hmac_hex(k, challenge)


# --- RSA-OAEP key halves to the NK ----------------------------------------------------------------

# SHA-1 is what the wire protocol fixes for OAEP (upstream agents and tenants use it); OAEP-SHA1
# remains sound as an encryption padding.
_SHA1 = hashes.SHA1()  # noqa: S303
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=_SHA1), algorithm=_SHA1, label=None)


def _load_rsa_public(pem: str | bytes) -> rsa.RSAPublicKey:
    raw = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # bad PEM/DER is a ValueError
        raise PayloadError("NK public key is not a PEM public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise PayloadError("NK public key must be RSA")
    return key


def encrypt_key_half(nk_public_pem: str | bytes, half: bytes) -> str:
    """b64(RSA-OAEP-SHA1(NK, half)): the ``encrypted_key`` of POST keys/ukey and keys/vkey."""
    key = _load_rsa_public(nk_public_pem)
    data = _check_len(half, "key half")
    return base64.b64encode(key.encrypt(data, _OAEP)).decode("ascii")


def decrypt_key_half(nk_private_key: rsa.RSAPrivateKey, b64text: object) -> bytes:
    """The 32-byte half inside ``encrypted_key``.

    Raises ValidationError("encrypted_key") on bad base64 and PayloadError when it does not
    decrypt under the NK or is not 32 bytes.
    """
    blob = validation.b64(b64text, "encrypted_key", max_len=1024)
    if not isinstance(nk_private_key, rsa.RSAPrivateKey):
        raise PayloadError("NK private key must be RSA")
    try:
        half = nk_private_key.decrypt(blob, _OAEP)
    except ValueError as exc:  # cryptography raises ValueError("Decryption failed")
        raise PayloadError("encrypted_key does not decrypt under the NK") from exc
    if len(half) != KEY_LEN:
        raise PayloadError(f"decrypted key half is not {KEY_LEN} bytes")
    return half
