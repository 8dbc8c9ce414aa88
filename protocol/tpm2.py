"""TPM 2.0 structure helpers on tpm2-pytss types: public areas, names, keys, algorithm names.

Everything here is pure: tpm2-pytss is used only for its (un)marshalling and name computation,
never for a TPM. Algorithm names are the ones Keylime speaks on the wire (``hash_alg``,
``sign_alg``, ``enc_alg`` and the ``accept_tpm_*_algs`` lists).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

from keytrio.protocol.errors import DecodeError, ValidationError

# --- algorithm names as Keylime spells them ------------------------------------------------------

HASH_ALGS: dict[str, int] = {
    "sha1": int(TPM2_ALG.SHA1),
    "sha256": int(TPM2_ALG.SHA256),
    "sha384": int(TPM2_ALG.SHA384),
    "sha512": int(TPM2_ALG.SHA512),
}
HASH_NAMES: dict[int, str] = {v: k for k, v in HASH_ALGS.items()}
DIGEST_SIZES: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

SIGN_ALGS: dict[str, int] = {
    "rsassa": int(TPM2_ALG.RSASSA),
    "rsapss": int(TPM2_ALG.RSAPSS),
    "ecdsa": int(TPM2_ALG.ECDSA),
    "ecschnorr": int(TPM2_ALG.ECSCHNORR),
}
SIGN_NAMES: dict[int, str] = {v: k for k, v in SIGN_ALGS.items()}

ENC_ALGS: dict[str, int] = {"rsa": int(TPM2_ALG.RSA), "ecc": int(TPM2_ALG.ECC)}
ENC_NAMES: dict[int, str] = {v: k for k, v in ENC_ALGS.items()}

_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

_CURVES: dict[int, type[ec.EllipticCurve]] = {
    int(TPM2_ECC.NIST_P256): ec.SECP256R1,
    int(TPM2_ECC.NIST_P384): ec.SECP384R1,
    int(TPM2_ECC.NIST_P521): ec.SECP521R1,
}

#: Attributes every AK must carry (TCG: a TPM-resident, TPM-generated, restricted signing key).
AK_REQUIRED_ATTRIBUTES: dict[str, int] = {
    "fixedTPM": int(TPMA_OBJECT.FIXEDTPM),
    "fixedParent": int(TPMA_OBJECT.FIXEDPARENT),
    "sensitiveDataOrigin": int(TPMA_OBJECT.SENSITIVEDATAORIGIN),
    "userWithAuth": int(TPMA_OBJECT.USERWITHAUTH),
    "restricted": int(TPMA_OBJECT.RESTRICTED),
    "sign": int(TPMA_OBJECT.SIGN_ENCRYPT),
}


def hash_alg_id(name: str) -> int:
    """TPM2_ALG id of a Keylime hash name ("sha256" -> 0x000B)."""
    try:
        return HASH_ALGS[name]
    except KeyError:
        raise ValidationError("hash_alg", f"unsupported hash algorithm {name!r}") from None


def hash_alg_name(alg_id: int) -> str:
    """Keylime hash name of a TPM2_ALG id (0x000B -> "sha256")."""
    try:
        return HASH_NAMES[alg_id]
    except KeyError:
        raise ValidationError("hash_alg", f"unsupported hash algorithm id {alg_id:#06x}") from None


def digest_size(name: str) -> int:
    hash_alg_id(name)
    return DIGEST_SIZES[name]


def crypto_hash(name: str) -> hashes.HashAlgorithm:
    """A fresh `cryptography` hash instance for a Keylime hash name."""
    hash_alg_id(name)
    return _CRYPTO_HASHES[name]()


_HASHLIB = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def digest(name: str, data: bytes) -> bytes:
    """H_name(data) with hashlib (the fast path for PCR and quote digests)."""
    hasher = _HASHLIB.get(name)
    if hasher is None:
        hash_alg_id(name)  # raises for an unknown name
        return hashlib.new(name, data).digest()
    return hasher(data).digest()


# --- TPM2B_PUBLIC ----------------------------------------------------------------------------------


def parse_public(raw: bytes) -> TPM2B_PUBLIC:
    """Unmarshal a TPM2B_PUBLIC; the bytes must hold exactly one, non-empty."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise DecodeError("TPM2B_PUBLIC: expected bytes")
    raw = bytes(raw)
    if len(raw) < 2 or int.from_bytes(raw[:2], "big") == 0:
        raise DecodeError("TPM2B_PUBLIC: empty")
    return unmarshal_exact(TPM2B_PUBLIC, raw)


def unmarshal_exact(cls: Any, raw: bytes) -> Any:
    """Unmarshal one tpm2-pytss structure that must fill ``raw`` exactly; DecodeError otherwise."""
    try:
        obj, used = cls.unmarshal(raw)
    except TSS2_Exception as exc:
        raise DecodeError(f"{cls.__name__}: {exc}") from None
    if used != len(raw):
        raise DecodeError(f"{cls.__name__}: {len(raw) - used} trailing bytes")
    return obj


def public_from_b64(text: str) -> TPM2B_PUBLIC:
    """A TPM2B_PUBLIC from the base64 text Keylime sends (``ek_tpm``, ``aik_tpm``, ``ak_tpm``)."""
    if not isinstance(text, str):
        raise DecodeError("TPM2B_PUBLIC: expected base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"TPM2B_PUBLIC: bad base64 ({exc})") from None
    return parse_public(raw)


def _coerce_public(public: TPM2B_PUBLIC | bytes) -> TPM2B_PUBLIC:
    if isinstance(public, TPM2B_PUBLIC):
        return public
    return parse_public(public)


def public_bytes(public: TPM2B_PUBLIC) -> bytes:
    """The marshalled TPM2B_PUBLIC (what ``ek_tpm``/``aik_tpm`` carry, base64-encoded)."""
    return public.marshal()


def object_name(public: TPM2B_PUBLIC | bytes) -> bytes:
    """The TPM Name: nameAlg (BE16) || H_nameAlg(marshalled TPMT_PUBLIC)."""
    pub = _coerce_public(public)
    alg = int(pub.publicArea.nameAlg)
    name = HASH_NAMES.get(alg)
    if name is None:
        raise ValidationError("public", f"unsupported nameAlg {alg:#06x}")
    area = pub.publicArea.marshal()
    return alg.to_bytes(2, "big") + hashlib.new(name, area).digest()


def public_key(public: TPM2B_PUBLIC | bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The `cryptography` public key of an RSA or ECC (P-256/P-384/P-521) public area."""
    area = _coerce_public(public).publicArea
    kind = int(area.type)
    if kind == TPM2_ALG.RSA:
        n = int.from_bytes(bytes(area.unique.rsa), "big")
        # exponent 0 means the TPM default 2^16+1
        e = int(area.parameters.rsaDetail.exponent) or 65537
        if n.bit_length() < 1024 or n % 2 == 0:
            raise ValidationError("public", "RSA modulus missing or invalid")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise ValidationError("public", f"invalid RSA key: {exc}") from None
    if kind == TPM2_ALG.ECC:
        curve_id = int(area.parameters.eccDetail.curveID)
        curve = _CURVES.get(curve_id)
        if curve is None:
            raise ValidationError("public", f"unsupported ECC curve {curve_id:#06x}")
        x = int.from_bytes(bytes(area.unique.ecc.x), "big")
        y = int.from_bytes(bytes(area.unique.ecc.y), "big")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
        except ValueError as exc:
            raise ValidationError("public", f"invalid ECC point: {exc}") from None
    raise ValidationError("public", f"unsupported key type {kind:#06x}")


def public_key_pem(public: TPM2B_PUBLIC | bytes) -> str:
    """SubjectPublicKeyInfo PEM of the public area's key."""
    key = public_key(public)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _scheme(area: TPMT_PUBLIC) -> tuple[int, int]:
    """(scheme alg id, scheme hash alg id) of an RSA or ECC public area."""
    kind = int(area.type)
    if kind == TPM2_ALG.RSA:
        sch = area.parameters.rsaDetail.scheme
    elif kind == TPM2_ALG.ECC:
        sch = area.parameters.eccDetail.scheme
    else:
        raise ValidationError("public", f"unsupported key type {kind:#06x}")
    scheme = int(sch.scheme)
    if scheme == TPM2_ALG.NULL:
        return scheme, int(TPM2_ALG.NULL)
    return scheme, int(sch.details.anySig.hashAlg)


def key_algorithms(public: TPM2B_PUBLIC | bytes) -> tuple[str, str, str]:
    """(enc_alg, sign_alg, hash_alg) of an AK in Keylime's names, e.g. ("rsa", "rsassa", "sha256")."""
    area = _coerce_public(public).publicArea
    kind = int(area.type)
    enc = ENC_NAMES.get(kind)
    if enc is None:
        raise ValidationError("ak", f"unsupported key type {kind:#06x}")
    scheme, halg = _scheme(area)
    sign = SIGN_NAMES.get(scheme)
    if sign is None:
        raise ValidationError("ak", f"unsupported signing scheme {scheme:#06x}")
    hname = HASH_NAMES.get(halg)
    if hname is None:
        raise ValidationError("ak", f"unsupported scheme hash {halg:#06x}")
    return enc, sign, hname


_SCHEMES_FOR = {
    int(TPM2_ALG.RSA): {"rsassa", "rsapss"},
    int(TPM2_ALG.ECC): {"ecdsa", "ecschnorr"},
}


def check_ak_attributes(public: TPM2B_PUBLIC | bytes) -> None:
    """Raise ValidationError unless the public area is a usable AK (restricted signing key)."""
    pub = _coerce_public(public)
    area = pub.publicArea
    attrs = int(area.objectAttributes)
    missing = [name for name, bit in AK_REQUIRED_ATTRIBUTES.items() if not attrs & bit]
    if missing:
        raise ValidationError("ak", "missing object attributes: " + ", ".join(missing))
    if attrs & int(TPMA_OBJECT.DECRYPT):
        raise ValidationError("ak", "an AK must not have the decrypt attribute")
    enc, sign, _ = key_algorithms(pub)
    if sign not in _SCHEMES_FOR[ENC_ALGS[enc]]:
        raise ValidationError("ak", f"scheme {sign} does not fit an {enc} key")
    if HASH_NAMES.get(int(area.nameAlg)) is None:
        raise ValidationError("ak", f"unsupported nameAlg {int(area.nameAlg):#06x}")
    public_key(pub)


@dataclass(frozen=True)
class AkKey:
    """An AK prepared for repeated quote checks: parse once, verify every poll.

    Parsing a TPM2B_PUBLIC through tpm2-pytss costs ~60 us, more than a signature check,
    so the verifier should keep one of these per agent.
    """

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    enc_alg: str
    sign_alg: str
    hash_alg: str
    name: bytes


def ak_key(public: TPM2B_PUBLIC | bytes) -> AkKey:
    """Parse and check an AK public area into an :class:`AkKey`."""
    pub = _coerce_public(public)
    enc, sign, halg = key_algorithms(pub)
    return AkKey(public_key(pub), enc, sign, halg, object_name(pub))


# --- PCR arithmetic ----------------------------------------------------------------------------------


def extend_value(bank: str, old: bytes, value_digest: bytes) -> bytes:
    """New PCR value after extending ``old`` with ``value_digest``: H(old || digest)."""
    size = digest_size(bank)
    if len(old) != size or len(value_digest) != size:
        raise ValidationError("pcr", f"{bank} PCR values and digests are {size} bytes")
    return hashlib.new(bank, old + value_digest).digest()


@functools.lru_cache(maxsize=4096)  # the verifier asks every poll with the same agent's NK
def pcr16_binding_value(bank: str, nk_pubkey_pem: str) -> bytes:
    """What PCR 16 holds after reset + extend with H(NK PEM text): H(0...0 || H(pem))."""
    size = digest_size(bank)
    return extend_value(bank, bytes(size), digest(bank, nk_pubkey_pem.encode("utf-8")))
