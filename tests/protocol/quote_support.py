"""Quotes and proofs of possession built in software with tpm2-pytss (independent of protocol.quote
and protocol.pop's decoders), signed with the keys of tpm2_support: shared by the protocol, verifier
and tenant tests."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ECC_PARAMETER,
    TPM2B_NAME,
    TPM2B_PUBLIC_KEY_RSA,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CLOCK_INFO,
    TPMS_PCR_SELECTION,
    TPMS_QUOTE_INFO,
    TPMS_SIGNATURE_ECC,
    TPMS_SIGNATURE_RSA,
    TPMT_SIGNATURE,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from keytrio.protocol import pop, quote, tpm2
from tests.protocol.tpm2_support import ak_public, private_key


def pcr_values(bank: str, pcrs: list[int], seed: bytes = b"") -> dict[int, bytes]:
    return {p: hashlib.new(bank, seed + bytes([p])).digest() for p in pcrs}


def make_attest(
    *,
    nonce: bytes = b"abcdefghij0123456789",
    bank: str = "sha256",
    pcrs: dict[int, bytes] | None = None,
    digest_alg: str | None = None,
    select: tuple[str, list[int]] | None = None,
    clock: tuple[int, int, int, int] = (100_000, 3, 1, 1),
    signer: bytes = b"\x00\x0b" + bytes(range(32)),
) -> bytes:
    """A marshalled TPMS_ATTEST quote built with tpm2-pytss (independent of protocol.quote)."""
    pcrs = pcr_values(bank, [0, 1, 2, 10, 16]) if pcrs is None else pcrs
    order = sorted(pcrs)
    sel_bank, sel_pcrs = select if select is not None else (bank, order)
    bitmap = sum(1 << p for p in sel_pcrs).to_bytes(3, "little")
    selection = TPML_PCR_SELECTION(
        pcrSelections=[TPMS_PCR_SELECTION(hash=tpm2.HASH_ALGS[sel_bank], sizeofSelect=3, pcrSelect=bitmap)]
    )
    pcr_digest = hashlib.new(digest_alg or bank, b"".join(pcrs[p] for p in order)).digest()
    attest = TPMS_ATTEST(
        magic=TPM2_GENERATED.VALUE,
        type=TPM2_ST.ATTEST_QUOTE,
        qualifiedSigner=TPM2B_NAME(signer),
        extraData=TPM2B_DATA(nonce),
        clockInfo=TPMS_CLOCK_INFO(clock=clock[0], resetCount=clock[1], restartCount=clock[2], safe=clock[3]),
        firmwareVersion=0x2019102300163636,
        attested=TPMU_ATTEST(quote=TPMS_QUOTE_INFO(pcrSelect=selection, pcrDigest=TPM2B_DIGEST(pcr_digest))),
    )
    return attest.marshal()


def sign_attest(attest: bytes, kind: str = "rsa", hash_alg: str = "sha256", scheme: str = "") -> bytes:
    """A marshalled TPMT_SIGNATURE over ``attest`` by the test key ``kind`` (built with tpm2-pytss)."""
    key = private_key(kind)
    h = tpm2.crypto_hash(hash_alg)
    halg = tpm2.HASH_ALGS[hash_alg]
    if isinstance(key, rsa.RSAPrivateKey):
        scheme = scheme or "rsassa"
        if scheme == "rsassa":
            raw = key.sign(attest, padding.PKCS1v15(), h)
            body = TPMU_SIGNATURE(rsassa=TPMS_SIGNATURE_RSA(hash=halg, sig=TPM2B_PUBLIC_KEY_RSA(raw)))
        else:
            raw = key.sign(attest, padding.PSS(padding.MGF1(h), padding.PSS.DIGEST_LENGTH), h)
            body = TPMU_SIGNATURE(rsapss=TPMS_SIGNATURE_RSA(hash=halg, sig=TPM2B_PUBLIC_KEY_RSA(raw)))
        alg = tpm2.SIGN_ALGS[scheme]
    else:
        r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(h)))
        size = (key.curve.key_size + 7) // 8
        body = TPMU_SIGNATURE(
            ecdsa=TPMS_SIGNATURE_ECC(
                hash=halg,
                signatureR=TPM2B_ECC_PARAMETER(r.to_bytes(size, "big")),
                signatureS=TPM2B_ECC_PARAMETER(s.to_bytes(size, "big")),
            )
        )
        alg = TPM2_ALG.ECDSA
    return TPMT_SIGNATURE(sigAlg=alg, signature=body).marshal()


def make_quote(
    kind: str = "rsa", bank: str = "sha256", pcrs: dict[int, bytes] | None = None, **attest_kw
) -> str:
    pcrs = pcr_values(bank, [0, 1, 2, 10, 16]) if pcrs is None else pcrs
    attest = make_attest(bank=bank, pcrs=pcrs, **attest_kw)
    return quote.build_quote(attest, sign_attest(attest, kind, bank), quote.encode_pcr_blob(bank, pcrs))


def make_pop(challenge: bytes, kind: str = "rsa", *, certified: str | None = None,
             hash_alg: str = "sha256") -> tuple[bytes, bytes]:
    """(message, signature) of TPM2_Certify(AK ``certified`` by AK ``kind``, qualifyingData=challenge),
    built in software: the attest marshalled by protocol.pop, signed with the test key."""
    name = tpm2.object_name(ak_public(certified or kind, hash_alg=hash_alg))
    message = pop.encode_certify(extra_data=challenge, name=name, qualified_signer=name)
    return message, sign_attest(message, kind, hash_alg)
