"""Key material of simulated agents: RSA-2048 EKs and AKs in software, and ActivateCredential.

Thousands of RSA-2048 keys at ~65 ms of key generation each would take longer than the benchmark
itself, so the keys are made from a pool of primes: ``PrimePool(k)`` generates ``k`` ordinary
RSA-2048 keys with `cryptography` and keeps their ``2k`` primes; key ``i`` is the product of the
``i``-th pair of distinct primes, giving ``k(2k-1)`` distinct 2048-bit moduli (40 keys -> 3,160).
Every signature and every OAEP decryption is then real RSA-2048 work, the same cost as any key's.
Keys sharing a prime are trivially factorable by GCD: this is a load generator, never a TPM.

The public areas are what a TPM reports for such keys: the TCG default RSA-2048 EK template
(AES-128-CFB, policy A) and keytrio's agent AK template (restricted RSASSA/SHA-256 signing key).
``activate_credential`` is TPM2_ActivateCredential (TPM 2.0 Part 1, 24) done with the EK's private
key: the inverse of ``protocol.credential.make_credential`` for RSA EKs.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_RSA_PARMS,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)

from keytrio.protocol import tpm2

try:  # cryptography >= 47 moved CFB to "decrepit" (the TPM's credential protection needs it)
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment]

E = 65537
# TCG EK Credential Profile, template L-1: PolicySecret(TPM_RH_ENDORSEMENT)
EK_POLICY_A = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
_IDENTITY = b"IDENTITY\x00"


class PrimePool:
    """``2 * keys`` RSA-1024 primes from ``keys`` generated RSA-2048 keys; ``key(i)`` pairs them."""

    def __init__(self, keys: int) -> None:
        primes: list[int] = []
        for _ in range(keys):
            nums = rsa.generate_private_key(public_exponent=E, key_size=2048).private_numbers()
            primes += [nums.p, nums.q]
        self.primes = primes
        self.pairs = list(itertools.combinations(range(len(primes)), 2))

    def __len__(self) -> int:
        return len(self.pairs)

    def key(self, i: int) -> rsa.RSAPrivateKey:
        a, b = self.pairs[i % len(self.pairs)]
        return rsa_key(self.primes[a], self.primes[b])


def rsa_key(p: int, q: int) -> rsa.RSAPrivateKey:
    """The RSA private key with primes ``p`` and ``q`` and e = 65537."""
    if p < q:
        p, q = q, p
    d = pow(E, -1, (p - 1) * (q - 1))
    nums = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(E, p * q))  # fmt: skip
    # validation re-runs primality checks (~10 ms); the primes come from OpenSSL's key generator
    return nums.private_key(unsafe_skip_rsa_key_validation=True)


def _modulus(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_numbers().n.to_bytes(256, "big")


def ek_public(key: rsa.RSAPrivateKey) -> TPM2B_PUBLIC:
    """The TPM2B_PUBLIC of an RSA-2048 EK (TCG default template) with this key's modulus."""
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)  # fmt: skip
    sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    area = TPMT_PUBLIC(
        type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs, authPolicy=EK_POLICY_A,
        parameters=TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
            symmetric=sym, scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL), keyBits=2048, exponent=0)),
        unique=TPMU_PUBLIC_ID(rsa=_modulus(key)),
    )  # fmt: skip
    return TPM2B_PUBLIC(publicArea=area)


def ak_public(key: rsa.RSAPrivateKey) -> TPM2B_PUBLIC:
    """The TPM2B_PUBLIC of an RSA-2048 RSASSA/SHA-256 AK (restricted signing key)."""
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT)  # fmt: skip
    scheme = TPMT_RSA_SCHEME(scheme=TPM2_ALG.RSASSA)
    scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    area = TPMT_PUBLIC(
        type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        parameters=TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), scheme=scheme, keyBits=2048, exponent=0)),
        unique=TPMU_PUBLIC_ID(rsa=_modulus(key)),
    )  # fmt: skip
    return TPM2B_PUBLIC(publicArea=area)


def _kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    # SP 800-108 counter-mode HMAC-SHA256; KBKDFHMAC adds the label's 0x00 separator itself
    return KBKDFHMAC(algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context,
                     fixed=None).derive(key)  # fmt: skip


class ActivationError(ValueError):
    pass


def _take2b(raw: bytes, off: int) -> tuple[bytes, int]:
    if off + 2 > len(raw):
        raise ActivationError("credential blob truncated")
    (size,) = struct.unpack_from(">H", raw, off)
    if off + 2 + size > len(raw):
        raise ActivationError("credential blob truncated")
    return raw[off + 2 : off + 2 + size], off + 2 + size


def activate_credential(ek: rsa.RSAPrivateKey, ak_name: bytes, blob: bytes) -> bytes:
    """The credential inside a tpm2-tools MakeCredential ``blob`` for this EK (SHA-256, AES-128)."""
    if len(blob) < 8 or struct.unpack_from(">II", blob, 0) != (0xBADCC0DE, 1):
        raise ActivationError("not a MakeCredential blob")
    id_object, off = _take2b(blob, 8)
    secret, off = _take2b(blob, off)
    if off != len(blob):
        raise ActivationError("trailing bytes after the encrypted secret")
    outer, off = _take2b(id_object, 0)
    enc_identity = id_object[off:]
    seed = ek.decrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), _IDENTITY))
    mac = hmac.new(_kdfa(seed, b"INTEGRITY", b"", 256), enc_identity + ak_name, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, outer):
        raise ActivationError("integrity HMAC mismatch: not made for this EK and AK")
    dec = Cipher(algorithms.AES(_kdfa(seed, b"STORAGE", ak_name, 128)), CFB(bytes(16))).decryptor()
    plain = dec.update(enc_identity) + dec.finalize()
    cred, _ = _take2b(plain, 0)
    return cred


def object_name(public: TPM2B_PUBLIC) -> bytes:
    return tpm2.object_name(public)
