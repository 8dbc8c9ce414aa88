"""Software keys and TPM2B_PUBLIC structures around them, shared by the protocol and actor tests."""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_SCHEME_HASH,
    TPMT_ASYM_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from keytrio.protocol import tpm2

AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
EK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)

@functools.cache
def private_key(kind: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """One key per kind per test session: 'rsa' (2048), 'rsa2' (another 2048), 'p256', 'p384'."""
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind])


def key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """The public half of ``key`` as SubjectPublicKeyInfo PEM."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ak_public(
    kind: str = "rsa",
    sign: str = "",
    hash_alg: str = "sha256",
    attrs: int = int(AK_ATTRS),
    name_alg: str = "sha256",
) -> TPM2B_PUBLIC:
    """A TPM2B_PUBLIC like tpm2_createak makes, around a software key."""
    sign = sign or ("rsassa" if kind.startswith("rsa") else "ecdsa")
    scheme = TPMT_ASYM_SCHEME(
        scheme=tpm2.SIGN_ALGS[sign],
        details=TPMU_ASYM_SCHEME(anySig=TPMS_SCHEME_HASH(hashAlg=tpm2.HASH_ALGS[hash_alg])),
    )
    return TPM2B_PUBLIC.from_pem(
        key_pem(private_key(kind)), nameAlg=tpm2.HASH_ALGS[name_alg], objectAttributes=attrs, scheme=scheme
    )


def ek_public(kind: str = "rsa") -> TPM2B_PUBLIC:
    """A storage-EK-like TPM2B_PUBLIC (restricted decrypt, AES-CFB) around a software key."""
    bits, name_alg = (256, "sha384") if kind == "p384" else (128, "sha256")
    sym = TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=bits), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
    )
    return TPM2B_PUBLIC.from_pem(
        key_pem(private_key(kind)),
        nameAlg=tpm2.HASH_ALGS[name_alg],
        objectAttributes=EK_ATTRS,
        symmetric=sym,
    )
