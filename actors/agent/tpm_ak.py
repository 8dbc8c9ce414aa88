"""The attestation key and what it signs: AK templates (RSA-2048 RSASSA, P-256 ECDSA), creating an
AK under the EK and reloading it from its saved blobs, TPM2_Quote and TPM2_Certify. A further AK
operation belongs here as one more ``*_sync`` function plus a :class:`actors.agent.tpm.Tpm`
method that runs it.

Blocking ESAPI code, run by :class:`actors.agent.tpm.Tpm` in its worker thread.
"""

from __future__ import annotations

import hashlib

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ATTEST,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)

from keytrio.actors.agent.tpm_core import (
    ALG_NAMES,
    AttestationKey,
    Certification,
    EndorsementKey,
    Quote,
    TpmError,
    hash_alg,
    read_pcrs_sync,
    selection,
)
from keytrio.actors.agent.tpm_ek import ek_auth

MAX_NONCE = 64  # TPM2B_DATA: TPM2_Quote's nonce, TPM2_Certify's qualifyingData


def ak_template(alg: str, hash_name: str) -> TPM2B_PUBLIC:
    """A restricted signing key's public template: RSA-2048 RSASSA or P-256 ECDSA over ``hash_name``."""
    halg = hash_alg(hash_name)
    attrs = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
    )
    null_sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    if alg == "rsa":
        scheme = TPMT_RSA_SCHEME(scheme=TPM2_ALG.RSASSA)
        scheme.details.anySig.hashAlg = halg
        area = TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attrs,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(symmetric=null_sym, scheme=scheme, keyBits=2048, exponent=0)
            ),
            unique=TPMU_PUBLIC_ID(rsa=b""),
        )
    elif alg == "ecc":
        scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.anySig.hashAlg = halg
        area = TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attrs,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=null_sym,
                    scheme=scheme,
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
            unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=b"", y=b"")),
        )
    else:
        raise TpmError(f"unsupported AK algorithm {alg!r}")
    return TPM2B_PUBLIC(publicArea=area)


def create_ak_sync(
    ectx: ESAPI, ek: EndorsementKey, alg: str, hash_name: str, owned: set[int]
) -> AttestationKey:
    """Create an AK under the EK and load it (its handle is added to ``owned``)."""
    template = ak_template(alg, hash_name)
    with ek_auth(ectx, ek) as sess:
        priv, pub, _, _, _ = ectx.create(ek.handle, TPM2B_SENSITIVE_CREATE(), template, session1=sess)
    return load_ak_sync(ectx, ek, pub, priv, alg, hash_name, owned)


def saved_ak(public: bytes, private: bytes) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE, str, str]:
    """(public, private, alg, signing hash) of an AK's saved blobs; TpmError if not one we make."""
    pub, _ = TPM2B_PUBLIC.unmarshal(public)
    priv, _ = TPM2B_PRIVATE.unmarshal(private)
    area = pub.publicArea
    if area.type == TPM2_ALG.RSA:
        alg, halg = "rsa", area.parameters.rsaDetail.scheme.details.anySig.hashAlg
    elif area.type == TPM2_ALG.ECC:
        alg, halg = "ecc", area.parameters.eccDetail.scheme.details.anySig.hashAlg
    else:
        raise TpmError("AK public area is neither RSA nor ECC")
    hash_name = ALG_NAMES.get(int(halg))
    if hash_name is None:
        raise TpmError(f"AK signing hash {halg} is not supported")
    return pub, priv, alg, hash_name


def load_ak_sync(
    ectx: ESAPI,
    ek: EndorsementKey,
    pub: TPM2B_PUBLIC,
    priv: TPM2B_PRIVATE,
    alg: str,
    hash_name: str,
    owned: set[int],
) -> AttestationKey:
    with ek_auth(ectx, ek) as sess:
        h = ectx.load(ek.handle, priv, pub, session1=sess)
    owned.add(int(h))
    name = bytes(ectx.tr_get_name(h))
    return AttestationKey(h, alg, hash_name, pub.marshal(), priv.marshal(), name)


def quote_sync(
    ectx: ESAPI, ak: AttestationKey, nonce: bytes, pcrs: list[int], bank: str, attempts: int
) -> Quote:
    """PCRs read and then quoted in one sequence; again if the quote's pcrDigest does not match
    the values read (an extend from another process slipped in between)."""
    sel = selection(bank, pcrs)
    for _ in range(attempts):
        values = read_pcrs_sync(ectx, bank, pcrs)
        quoted, sig = ectx.quote(ak.handle, sel, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        attest = bytes(quoted)
        info, _ = TPMS_ATTEST.unmarshal(attest)
        # pcrDigest uses the signing scheme's hash, not the bank's
        digest = hashlib.new(ak.hash_alg, b"".join(values[i] for i in pcrs)).digest()
        if bytes(info.attested.quote.pcrDigest) == digest:
            return Quote(attest, sig.marshal(), bank.lower(), values, nonce)
    raise TpmError(f"PCRs kept changing during {attempts} quote attempts")


def certify_sync(ectx: ESAPI, ak: AttestationKey, qualifying_data: bytes) -> Certification:
    """TPM2_Certify(object = AK, signKey = AK, qualifyingData), signed with the AK's own scheme."""
    attest, sig = ectx.certify(ak.handle, ak.handle, qualifying_data, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                               session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD)
    return Certification(bytes(attest), sig.marshal())
