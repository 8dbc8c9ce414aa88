"""What every part of the TPM layer shares: its values (keys, quotes, errors), the hash algorithm
tables, PCR selections, and the small ESAPI helpers run inside the worker thread.

A leaf: :mod:`actors.agent.tpm_ek`, :mod:`actors.agent.tpm_ak` and :mod:`actors.agent.tpm` import
it, it imports none of them. Functions named ``*_sync`` take an ESAPI context and block: only
:class:`actors.agent.tpm.Tpm` calls them, in its worker thread, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION

EkAlg = Literal["rsa2048", "ecc384"]
AkAlg = Literal["rsa", "ecc"]

HASH_ALGS: dict[str, TPM2_ALG] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}
ALG_NAMES = {int(v): k for k, v in HASH_ALGS.items()}
NUM_PCRS = 24
_PCR_READ_MAX = 8  # TPM2_PCR_Read returns at most 8 digests per call


class TpmError(Exception):
    """A TPM command failed, or the TPM answered something inconsistent."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


@dataclass(frozen=True)
class EndorsementKey:
    handle: ESYS_TR  # ESYS handle in this Tpm's context (transient unless persistent=True)
    alg: str  # "rsa2048" | "ecc384"
    public: bytes  # marshalled TPM2B_PUBLIC (Keylime's ek_tpm, base64)
    name: bytes  # TPM2B_NAME contents (nameAlg id + digest)
    cert_der: bytes | None  # EK certificate from NV (None if the index is absent)
    persistent: bool


@dataclass(frozen=True)
class AttestationKey:
    handle: ESYS_TR  # loaded (transient) handle in this Tpm's context
    alg: str  # "rsa" | "ecc"
    hash_alg: str  # signing hash
    public: bytes  # marshalled TPM2B_PUBLIC (Keylime's aik_tpm)
    private: bytes  # marshalled TPM2B_PRIVATE (wrapped by the EK; keep it to reload the AK)
    name: bytes  # TPM2B_NAME contents (0x000b + sha256(TPMT_PUBLIC))


@dataclass(frozen=True)
class Quote:
    attest: bytes  # TPMS_ATTEST (what the signature covers)
    signature: bytes  # marshalled TPMT_SIGNATURE
    bank: str
    pcrs: dict[int, bytes]  # the quoted PCR values, read in the same TPM sequence
    nonce: bytes


@dataclass(frozen=True)
class Certification:
    attest: bytes  # TPMS_ATTEST (type TPM_ST_ATTEST_CERTIFY), what the signature covers
    signature: bytes  # marshalled TPMT_SIGNATURE


def public_key(public: bytes) -> PublicKeyTypes:
    """A cryptography public key from a marshalled TPM2B_PUBLIC (EK or AK)."""
    pub, _ = TPM2B_PUBLIC.unmarshal(public)
    return serialization.load_der_public_key(pub.publicArea.to_der())


def hash_alg(name: str) -> TPM2_ALG:
    try:
        return HASH_ALGS[name.lower()]
    except KeyError:
        raise TpmError(f"unsupported hash algorithm {name!r}") from None


def selection(bank: str, pcrs: Iterable[int]) -> TPML_PCR_SELECTION:
    pcrs = sorted(set(pcrs))
    if not pcrs:
        raise TpmError("empty PCR selection")
    if any(not 0 <= p < NUM_PCRS for p in pcrs):
        raise TpmError(f"PCR index out of range in {pcrs}")
    hash_alg(bank)
    return TPML_PCR_SELECTION.parse(f"{bank.lower()}:{','.join(map(str, pcrs))}")


def _selected(sel: TPML_PCR_SELECTION) -> list[int]:
    """PCR indices (ascending) selected in the first (only) bank of a selection."""
    if sel.count == 0:
        return []
    s = sel.pcrSelections[0]
    bitmap = bytes(s.pcrSelect)[: s.sizeofSelect]
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def read_pcrs_sync(ectx: ESAPI, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    """PCR_Read in chunks of 8; fails if the bank is inactive (the TPM returns no digests)."""
    selection(bank, pcrs)  # validate
    out: dict[int, bytes] = {}
    for i in range(0, len(pcrs), _PCR_READ_MAX):
        chunk = pcrs[i : i + _PCR_READ_MAX]
        _, sel_out, digests = ectx.pcr_read(selection(bank, chunk))
        got = _selected(sel_out)
        if got != chunk or len(digests) != len(chunk):
            raise TpmError(f"TPM returned PCRs {got} of {bank} for requested {chunk} (inactive bank?)")
        for idx, d in zip(chunk, digests, strict=True):
            out[idx] = bytes(d)
    return out


def handles_sync(ectx: ESAPI, first: int) -> list[int]:
    """Every handle of the range starting at ``first`` (GetCapability HANDLES, paged)."""
    more = True
    handles: list[int] = []
    start = first
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
        got = [int(h) for h in data.data.handles]
        handles += got
        if not got:
            break
        start = got[-1] + 1
    return handles


def flush_transients_sync(ectx: ESAPI) -> None:
    """Flush transient objects left loaded by earlier clients (no resource manager on swtpm)."""
    for h in handles_sync(ectx, int(TPM2_HC.TRANSIENT_FIRST)):
        try:
            tr = ectx.tr_from_tpmpublic(h)
            ectx.flush_context(tr)
        except TSS2_Exception:
            pass  # raced with another flush, or not readable: nothing to free
