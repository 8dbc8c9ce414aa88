"""The TPM side of push mode: TPM2_Certify of the AK by itself (the PoP session's proof).

The verifier's challenge goes in as qualifyingData; the AK certifies its own name and signs with
its own scheme (RSASSA or ECDSA with its hash; the verifier fixes sha256 + rsassa and our AKs use
that by default). The call goes through the Tpm object's worker-thread runner, so it is
serialised with every other command on that TPM (one ESAPI context, one thread at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPMT_SIG_SCHEME

from keytrio.actors.agent.tpm import AttestationKey, Tpm, TpmError

_MAX_QUALIFYING = 64  # TPM2B_DATA


@dataclass(frozen=True)
class Certification:
    attest: bytes  # TPMS_ATTEST (type TPM_ST_ATTEST_CERTIFY), what the signature covers
    signature: bytes  # marshalled TPMT_SIGNATURE


async def certify_self(tpm: Tpm, ak: AttestationKey, qualifying_data: bytes) -> Certification:
    """TPM2_Certify(object = AK, signKey = AK, qualifyingData): proves this TPM holds the AK now."""
    if len(qualifying_data) > _MAX_QUALIFYING:
        raise TpmError(f"challenge longer than {_MAX_QUALIFYING} bytes")

    def _certify(ectx: ESAPI) -> Certification:
        attest, sig = ectx.certify(ak.handle, ak.handle, qualifying_data, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                   session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD)
        return Certification(bytes(attest), sig.marshal())

    # Tpm keeps its ESAPI runner private; the push room adds this one command without growing tpm.py
    return await tpm._run(_certify)
