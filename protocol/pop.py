"""Proof of possession of the AK for push-model sessions (``tpm_pop``), as upstream 7.14.3 does it.

The verifier hands out a random challenge (:func:`new_challenge`, 16 bytes, base64 on the wire).
The agent answers ``TPM2_Certify(objectHandle=AK, signHandle=AK, qualifyingData=challenge)``: a
TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY (``message``) and its TPMT_SIGNATURE (``signature``).
:func:`verify_pop` accepts it only when

* the attest is TPM-generated (magic TPM_GENERATED_VALUE: a restricted key such as the AK signs
  nothing else, so outside data cannot be passed off as an attest),
* it is a certify whose ``extraData`` is exactly the challenge,
* the certified object is the AK itself (``attested.certify.name`` = the AK's Name),
* the signature verifies with the enrolled AK's public key, in the AK's own scheme and hash.

:func:`encode_certify` marshals such an attest (software agents, tests); pure, no TPM.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from tpm2_pytss.types import TPM2B_PUBLIC

from keytrio.protocol import tpm2
from keytrio.protocol.errors import DecodeError, ProtocolError
from keytrio.protocol.quote import ALG_ECDSA, ALG_RSAPSS, ALG_RSASSA, ClockInfo, Signature, decode_signature

CHALLENGE_LEN = 16  # bytes, as upstream's verifier draws them
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017
_MAX_NAME = 66
_MAX_DATA = 66


class PopError(ProtocolError):
    """The proof of possession does not hold; ``reason`` says why (no secrets in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CertifyAttest:
    """The fields of a TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY."""

    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int
    name: bytes
    qualified_name: bytes


def new_challenge() -> bytes:
    """A fresh random challenge (CSPRNG)."""
    return secrets.token_bytes(CHALLENGE_LEN)


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise DecodeError("TPMS_ATTEST: truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def tpm2b(self, limit: int, what: str) -> bytes:
        size = self.uint(2)
        if size > limit:
            raise DecodeError(f"TPMS_ATTEST: {what} of {size} bytes exceeds {limit}")
        return self.take(size)


def decode_certify(raw: bytes) -> CertifyAttest:
    """Decode a marshalled certify TPMS_ATTEST; DecodeError on anything else."""
    r = _Reader(bytes(raw))
    if r.uint(4) != TPM_GENERATED_VALUE:
        raise DecodeError("TPMS_ATTEST: magic is not TPM_GENERATED_VALUE")
    if r.uint(2) != TPM_ST_ATTEST_CERTIFY:
        raise DecodeError("TPMS_ATTEST: type is not TPM_ST_ATTEST_CERTIFY")
    signer = r.tpm2b(_MAX_NAME, "qualifiedSigner")
    extra = r.tpm2b(_MAX_DATA, "extraData")
    clock = ClockInfo(r.uint(8), r.uint(4), r.uint(4), r.uint(1))
    firmware = r.uint(8)
    name = r.tpm2b(_MAX_NAME, "name")
    qualified = r.tpm2b(_MAX_NAME, "qualifiedName")
    if r.pos != len(r.buf):
        raise DecodeError("TPMS_ATTEST: trailing bytes")
    return CertifyAttest(signer, extra, clock, firmware, name, qualified)


def encode_certify(
    *,
    extra_data: bytes,
    name: bytes,
    qualified_name: bytes = b"",
    qualified_signer: bytes = b"",
    clock: tuple[int, int, int, int] = (1000, 1, 0, 1),
    firmware_version: int = 0,
) -> bytes:
    """Marshal a certify TPMS_ATTEST (what TPM2_Certify signs)."""

    def b2(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    return (
        struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_CERTIFY)
        + b2(qualified_signer)
        + b2(extra_data)
        + struct.pack(">QIIB", *clock)
        + struct.pack(">Q", firmware_version)
        + b2(name)
        + b2(qualified_name or name)
    )


def _verify(ak: tpm2.AkKey, sig: Signature, message: bytes) -> None:
    hash_name = tpm2.HASH_NAMES.get(sig.hash_alg)
    sign_name = tpm2.SIGN_NAMES.get(sig.sig_alg)
    if sign_name != ak.sign_alg or hash_name != ak.hash_alg:
        raise PopError(f"signed with {sign_name}/{hash_name}, the AK's scheme is {ak.sign_alg}/{ak.hash_alg}")
    h = tpm2.crypto_hash(hash_name)
    digest = tpm2.digest(hash_name, message)
    try:
        if sig.sig_alg in (ALG_RSASSA, ALG_RSAPSS) and isinstance(ak.key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15() if sig.sig_alg == ALG_RSASSA else padding.PSS(padding.MGF1(h), padding.PSS.AUTO)
            )
            ak.key.verify(sig.sig, digest, pad, Prehashed(h))
        elif sig.sig_alg == ALG_ECDSA and isinstance(ak.key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
            ak.key.verify(der, digest, ec.ECDSA(Prehashed(h)))
        else:
            raise PopError(f"cannot verify a {sign_name} signature with this AK")
    except InvalidSignature:
        # upstream's str(InvalidSignature()) is "" and it took that for success: never here
        raise PopError("signature does not verify with the AK") from None


def verify_pop(
    message: bytes, signature: bytes, *, ak_public: TPM2B_PUBLIC | bytes | tpm2.AkKey, challenge: bytes
) -> CertifyAttest:
    """The decoded attest if ``message``/``signature`` prove possession of the AK for ``challenge``;
    else :class:`PopError` (bad structures are PopErrors too, naming what was wrong)."""
    try:
        ak = ak_public if isinstance(ak_public, tpm2.AkKey) else tpm2.ak_key(ak_public)
    except ProtocolError as exc:
        raise PopError(f"the enrolled AK is unusable ({exc})") from None
    try:
        attest = decode_certify(message)
        sig = decode_signature(signature)
    except ProtocolError as exc:
        raise PopError(str(exc)) from None
    if not challenge or attest.extra_data != challenge:
        raise PopError("the certify's qualifying data is not the session's challenge")
    if attest.name != ak.name:
        raise PopError("the certified object is not the enrolled AK")
    _verify(ak, sig, bytes(message))
    return attest
