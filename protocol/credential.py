"""TPM2 MakeCredential in the tpm2-tools file format, the registrar's credential and auth tag.

The blob is what Keylime's registrar returns as ``results.blob`` (base64): BE32 0xBADCC0DE,
BE32 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET, ready for ``tpm2_activatecredential`` or
ESAPI ActivateCredential with the EK.

MakeCredential is written out here (TPM 2.0 Part 1, 24.4 "Protected Storage" / 24.6
"Credential protection") rather than taken from ``tpm2_pytss.utils.make_credential`` so the
randomness comes in as a parameter: the seed (RSA EK) or the ephemeral ECDH key (ECC EK) is drawn
from ``rng``. RSA-OAEP padding draws its own randomness inside `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPM2B_PUBLIC

from keytrio.protocol import tpm2
from keytrio.protocol.errors import DecodeError, ValidationError

try:  # cryptography >= 47 moved CFB to "decrepit"; the TPM's credential protection needs it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    CFB = modes.CFB  # type: ignore[assignment,misc]

BLOB_MAGIC = 0xBADCC0DE
BLOB_VERSION = 1
_IDENTITY = b"IDENTITY\x00"  # label of the seed encryption, null included (Part 1, 24.4)
_CREDENTIAL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz"
CREDENTIAL_LENGTH = 32


def _kdfa(hash_name: str, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    # KDFa = SP 800-108 counter mode HMAC: [i]32 || label || 0x00 || context || [bits]32;
    # KBKDFHMAC inserts the 0x00 separator itself, so the label goes in without its null.
    kdf = KBKDFHMAC(
        algorithm=tpm2.crypto_hash(hash_name),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    )
    return kdf.derive(key)


def _kdfe(hash_name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    # KDFe = SP 800-56A concatenation KDF: H([i]32 || Z || label(with null) || partyU || partyV)
    kdf = ConcatKDFHash(
        algorithm=tpm2.crypto_hash(hash_name), length=bits // 8, otherinfo=label + party_u + party_v
    )
    return kdf.derive(z)


def _rsa_seed(key: rsa.RSAPublicKey, hash_name: str, rng: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    seed = rng(tpm2.digest_size(hash_name))
    h = tpm2.crypto_hash(hash_name)
    enc = key.encrypt(seed, padding.OAEP(padding.MGF1(h), h, _IDENTITY))
    return seed, enc


def _ecc_seed(
    key: ec.EllipticCurvePublicKey, hash_name: str, rng: Callable[[int], bytes]
) -> tuple[bytes, bytes]:
    curve = key.curve
    size = (curve.key_size + 7) // 8
    order = _ORDERS[curve.name]
    # 8 extra bytes make the reduction mod (order - 1) bias-free for all practical purposes
    scalar = int.from_bytes(rng(size + 8), "big") % (order - 1) + 1
    eph = ec.derive_private_key(scalar, curve)
    z = eph.exchange(ec.ECDH(), key)
    ex = eph.public_key().public_numbers().x.to_bytes(size, "big")
    ey = eph.public_key().public_numbers().y.to_bytes(size, "big")
    kx = key.public_numbers().x.to_bytes(size, "big")
    seed = _kdfe(hash_name, z, _IDENTITY, ex, kx, tpm2.digest_size(hash_name) * 8)
    # the encrypted secret is the marshalled TPMS_ECC_POINT of the ephemeral public key
    point = struct.pack(">H", size) + ex + struct.pack(">H", size) + ey
    return seed, point


_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp521r1": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}


def _ek_parameters(ek: TPM2B_PUBLIC) -> tuple[str, int]:
    """(nameAlg hash name, AES key bits) of a storage EK with an AES-CFB symmetric definition."""
    area = ek.publicArea
    hash_name = tpm2.HASH_NAMES.get(int(area.nameAlg))
    if hash_name is None:
        raise ValidationError("ek", f"unsupported nameAlg {int(area.nameAlg):#06x}")
    sym = area.parameters.asymDetail.symmetric
    if int(sym.algorithm) != TPM2_ALG.AES or int(sym.mode.sym) != TPM2_ALG.CFB:
        raise ValidationError("ek", "the EK's symmetric definition must be AES-CFB")
    bits = int(sym.keyBits.sym)
    if bits not in (128, 192, 256):
        raise ValidationError("ek", f"unsupported AES key size {bits}")
    return hash_name, bits


def make_credential(
    ek_public: TPM2B_PUBLIC | bytes,
    ak_name: bytes,
    credential: bytes,
    *,
    rng: Callable[[int], bytes] = os.urandom,
) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), marshalled, protecting ``credential`` for the EK.

    Only the TPM holding the EK, with the object named ``ak_name`` loaded, can recover it.
    """
    ek = ek_public if isinstance(ek_public, TPM2B_PUBLIC) else tpm2.parse_public(ek_public)
    hash_name, sym_bits = _ek_parameters(ek)
    hlen = tpm2.digest_size(hash_name)
    if not isinstance(credential, bytes) or not 0 < len(credential) <= hlen:
        raise ValidationError("credential", f"must be 1-{hlen} bytes for this EK")
    if not isinstance(ak_name, bytes) or len(ak_name) < 3:
        raise ValidationError("ak_name", "must be a TPM Name (nameAlg || digest)")
    key = tpm2.public_key(ek)
    if isinstance(key, rsa.RSAPublicKey):
        seed, enc_seed = _rsa_seed(key, hash_name, rng)
    else:
        if key.curve.name not in _ORDERS:
            raise ValidationError("ek", f"unsupported curve {key.curve.name}")
        seed, enc_seed = _ecc_seed(key, hash_name, rng)

    sym_key = _kdfa(hash_name, seed, b"STORAGE", ak_name, sym_bits)
    # CFB with a zero IV: each credential gets a fresh seed, hence a fresh key
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(struct.pack(">H", len(credential)) + credential) + encryptor.finalize()
    hmac_key = _kdfa(hash_name, seed, b"INTEGRITY", b"", hlen * 8)
    mac = crypto_hmac.HMAC(hmac_key, tpm2.crypto_hash(hash_name))
    mac.update(enc_identity + ak_name)
    outer = mac.finalize()
    id_object = struct.pack(">H", hlen) + outer + enc_identity
    return (
        struct.pack(">H", len(id_object)) + id_object,
        struct.pack(">H", len(enc_seed)) + enc_seed,
    )


def make_credential_blob(
    ek_public: TPM2B_PUBLIC | bytes,
    ak_name: bytes,
    credential: bytes,
    *,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """The tpm2-tools MakeCredential file (Keylime's registration ``blob``, before base64)."""
    id_object, secret = make_credential(ek_public, ak_name, credential, rng=rng)
    return struct.pack(">II", BLOB_MAGIC, BLOB_VERSION) + id_object + secret


def _tpm2b(raw: bytes, off: int, what: str) -> tuple[bytes, int]:
    if off + 2 > len(raw):
        raise DecodeError(f"credential blob: {what} truncated")
    (size,) = struct.unpack_from(">H", raw, off)
    end = off + 2 + size
    if size == 0 or end > len(raw):
        raise DecodeError(f"credential blob: {what} empty or truncated")
    return raw[off:end], end


def parse_credential_blob(raw: bytes) -> tuple[TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET]:
    """Split a tpm2-tools MakeCredential file into its two TPM2B structures."""
    raw = bytes(raw)
    if len(raw) < 8:
        raise DecodeError("credential blob: truncated header")
    magic, version = struct.unpack_from(">II", raw, 0)
    if magic != BLOB_MAGIC or version != BLOB_VERSION:
        raise DecodeError("credential blob: bad magic or version")
    id_raw, off = _tpm2b(raw, 8, "TPM2B_ID_OBJECT")
    secret_raw, off = _tpm2b(raw, off, "TPM2B_ENCRYPTED_SECRET")
    if off != len(raw):
        raise DecodeError("credential blob: trailing bytes")
    try:
        id_object, used_id = TPM2B_ID_OBJECT.unmarshal(id_raw)
        secret, used_secret = TPM2B_ENCRYPTED_SECRET.unmarshal(secret_raw)
    except TSS2_Exception as exc:
        raise DecodeError(f"credential blob: {exc}") from None
    if used_id != len(id_raw) or used_secret != len(secret_raw):
        raise DecodeError("credential blob: inconsistent sizes")
    return id_object, secret


# --- the registrar's credential and the agent's proof of activation ---------------------------------


def new_credential(random32: bytes) -> bytes:
    """32 ASCII letters/digits from 32 random bytes (~190 bits), as the registrar's credential."""
    if not isinstance(random32, bytes) or len(random32) < CREDENTIAL_LENGTH:
        raise ValidationError("random32", f"need at least {CREDENTIAL_LENGTH} random bytes")
    # the 256-bit number reduced mod 62^32 (~2^190.5): bias below 2^-65
    n = int.from_bytes(random32[:CREDENTIAL_LENGTH], "big")
    out = []
    for _ in range(CREDENTIAL_LENGTH):
        n, digit = divmod(n, len(_CREDENTIAL_ALPHABET))
        out.append(_CREDENTIAL_ALPHABET[digit])
    return "".join(out).encode("ascii")


def activation_auth_tag(credential: bytes, agent_id: str) -> str:
    """hex(HMAC-SHA384(key = base64(credential) as ASCII, msg = agent id)), the ``auth_tag``."""
    key = base64.b64encode(credential)
    return hmac.new(key, agent_id.encode("utf-8"), hashlib.sha384).hexdigest()


def check_auth_tag(credential: bytes, agent_id: str, tag: str) -> bool:
    """Constant-time check of an activation ``auth_tag`` (hex, any case)."""
    if not isinstance(tag, str):
        return False
    expected = activation_auth_tag(credential, agent_id).encode("ascii")
    return hmac.compare_digest(expected, tag.lower().encode("utf-8", "replace"))
