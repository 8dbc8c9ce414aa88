"""TPM access layer: tpm2-pytss ESAPI over any TCTI, driven from Trio.

One ESAPI context per TPM. ESAPI calls block (and release the GIL), and one context must never be
used by two threads at once, so every call goes through ``trio.to_thread.run_sync`` with a
per-TPM ``CapacityLimiter(1)``; multi-command sequences (PCR read + quote, policy session +
activate) run inside one sync function so nothing interleaves with them.

TCTI strings: ``swtpm:path=<socket>`` / ``swtpm:host=127.0.0.1,port=P`` (testbed swtpm),
``device:/dev/tpmrm0`` (hardware through the kernel resource manager).

swtpm has no resource manager and only 3 transient object slots, and objects stay loaded after a
client disconnects: this layer flushes every transient object and session it does not hand out,
``close()`` flushes the ones it handed out, and ``open()`` flushes leftovers (``flush_stale``).

The job is split: this module holds the context (open, the one-at-a-time worker thread, close)
and the public :class:`Tpm` methods; :mod:`actors.agent.tpm_ek` the EK and credential activation,
:mod:`actors.agent.tpm_ak` the AK and what it signs (quotes), :mod:`actors.agent.tpm_core` the
shared values. The values are re-exported here, since most callers only need this one module.
"""


from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import trio
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_SU
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

from keytrio.actors.agent import tpm_ak, tpm_ek
from keytrio.actors.agent.tpm_core import (
    ALG_NAMES,
    NUM_PCRS,
    AkAlg,
    AttestationKey,
    Certification,
    EkAlg,
    EndorsementKey,
    Quote,
    TpmError,
    flush_transients_sync,
    public_key,
    read_pcrs_sync,
    selection,
)
from keytrio.actors.agent.tpm_core import hash_alg as bank_alg
from keytrio.actors.agent.tpm_ek import EK_CERT_INDEX

__all__ = [
    "EK_CERT_INDEX",
    "AttestationKey",
    "Certification",
    "EndorsementKey",
    "Quote",
    "Tpm",
    "TpmError",
    "public_key",
]

T = TypeVar("T")


@dataclass
class Tpm:
    """One TPM behind one ESAPI context. Create with ``await Tpm.open(tcti)``."""

    _ectx: ESAPI
    tcti: str
    _limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    _owned: set[int] = field(default_factory=set)  # transient ESYS_TRs we must flush on close
    _closed: bool = False

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, tcti: str, *, owner_password: str | None = None, flush_stale: bool = True
    ) -> Tpm:
        """Connect to the TPM. ``owner_password`` authorizes the owner and endorsement hierarchies.

        ``flush_stale`` flushes transient objects that a previous client left loaded (swtpm has no
        resource manager; under /dev/tpmrm0 there are none to see).
        """

        def _open() -> ESAPI:
            ectx = ESAPI(tcti)
            try:
                if owner_password:
                    ectx.tr_set_auth(ESYS_TR.OWNER, owner_password.encode())
                    ectx.tr_set_auth(ESYS_TR.ENDORSEMENT, owner_password.encode())
                if flush_stale:
                    flush_transients_sync(ectx)
            except BaseException:
                ectx.close()
                raise
            return ectx

        try:
            ectx = await trio.to_thread.run_sync(_open)
        except TSS2_Exception as e:
            raise TpmError(f"cannot open TPM at {tcti!r}: {e}", rc=int(e.rc)) from e
        return cls(ectx, tcti)

    async def _run(self, fn: Callable[[ESAPI], T]) -> T:
        """Run ``fn(ectx)`` in a worker thread, one at a time per TPM; TSS errors -> TpmError."""
        if self._closed:
            raise TpmError("TPM context is closed")

        def call() -> T:
            try:
                return fn(self._ectx)
            except TSS2_Exception as e:
                raise TpmError(str(e), rc=int(e.rc)) from e

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def close(self) -> None:
        """Flush the transient objects this context handed out and close it."""
        if self._closed:
            return

        def _close(ectx: ESAPI) -> None:
            try:
                for h in list(self._owned):
                    try:
                        ectx.flush_context(ESYS_TR(h))
                    except TSS2_Exception:
                        pass  # already gone (flushed, or the TPM restarted)
                self._owned.clear()
            finally:
                ectx.close()

        with trio.CancelScope(shield=True):
            try:
                await self._run(_close)
            finally:
                self._closed = True

    async def __aenter__(self) -> Tpm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def shutdown_clear(self) -> None:
        """TPM2_Shutdown(CLEAR): send before powering the (s)TPM off, so its clock stays 'safe'."""
        await self._run(lambda e: e.shutdown(TPM2_SU.CLEAR))

    async def flush(self, key: EndorsementKey | AttestationKey) -> None:
        """Unload a transient key handed out by this context (persistent EKs are left alone)."""
        if isinstance(key, EndorsementKey) and key.persistent:
            return

        def _flush(ectx: ESAPI) -> None:
            ectx.flush_context(key.handle)
            self._owned.discard(int(key.handle))

        await self._run(_flush)

    # -- misc -----------------------------------------------------------------------------------

    async def get_random(self, n: int) -> bytes:
        def _rand(ectx: ESAPI) -> bytes:
            out = b""
            while len(out) < n:
                out += bytes(ectx.get_random(min(n - len(out), 32)))
            return out

        return await self._run(_rand)

    async def active_banks(self) -> list[str]:
        """Hash algorithms of the PCR banks that have at least one PCR allocated."""

        def _banks(ectx: ESAPI) -> list[str]:
            _, data = ectx.get_capability(TPM2_CAP.PCRS, 0, 1)
            out = []
            for s in data.data.assignedPCR:
                if any(bytes(s.pcrSelect)[: s.sizeofSelect]) and int(s.hash) in ALG_NAMES:
                    out.append(ALG_NAMES[int(s.hash)])
            return out

        return await self._run(_banks)

    async def reset_count(self) -> int:
        """TPMS_CLOCK_INFO.resetCount (increments on every TPM reset, i.e. reboot)."""
        return await self._run(lambda e: int(e.read_clock().clockInfo.resetCount))

    # -- endorsement key --------------------------------------------------------------------------

    async def endorsement_key(
        self, *, alg: EkAlg = "rsa2048", handle: Literal["generate"] | int = "generate"
    ) -> EndorsementKey:
        """The EK: created from the TCG default template (``generate``) or a persistent handle.

        A generated EK stays loaded (one transient slot) until :meth:`flush` or :meth:`close`.
        """
        if alg not in EK_CERT_INDEX:
            raise TpmError(f"unsupported EK algorithm {alg!r}")
        return await self._run(lambda ectx: tpm_ek.endorsement_key_sync(ectx, alg, handle, self._owned))

    # -- attestation key ------------------------------------------------------------------------

    async def create_ak(
        self, ek: EndorsementKey, *, alg: AkAlg = "rsa", hash_alg: str = "sha256"
    ) -> AttestationKey:
        """Create and load a restricted signing key under the EK (RSA-2048 RSASSA or P-256 ECDSA)."""
        tpm_ak.ak_template(alg, hash_alg)  # an unsupported algorithm fails before the TPM is asked
        return await self._run(lambda ectx: tpm_ak.create_ak_sync(ectx, ek, alg, hash_alg, self._owned))

    async def load_ak(self, ek: EndorsementKey, public: bytes, private: bytes) -> AttestationKey:
        """Reload an AK from its saved public/private blobs (same EK, so same seed): same name."""
        pub, priv, alg, hash_alg = tpm_ak.saved_ak(public, private)
        return await self._run(lambda ectx: tpm_ak.load_ak_sync(ectx, ek, pub, priv, alg, hash_alg, self._owned))

    async def persist(self, key: AttestationKey | EndorsementKey, persistent_handle: int) -> ESYS_TR:
        """EvictControl a loaded key to ``persistent_handle`` (owner auth); returns its ESYS handle."""

        def _persist(ectx: ESAPI) -> ESYS_TR:
            return ectx.evict_control(ESYS_TR.OWNER, key.handle, persistent_handle)

        return await self._run(_persist)

    # -- PCRs -----------------------------------------------------------------------------------

    async def read_pcrs(self, bank: str, pcrs: Iterable[int]) -> dict[int, bytes]:
        sel = sorted(set(pcrs))
        return await self._run(lambda ectx: read_pcrs_sync(ectx, bank, sel))

    async def extend(self, pcr: int, digests: dict[str, bytes]) -> None:
        """PCR_Extend ``pcr`` with one digest per bank (banks not given are left alone)."""
        values = []
        for bank, digest in digests.items():
            alg = bank_alg(bank)
            if len(digest) != hashlib.new(bank.lower()).digest_size:
                raise TpmError(f"{bank} digest must be {hashlib.new(bank.lower()).digest_size} bytes")
            values.append(TPMT_HA(hashAlg=alg, digest=TPMU_HA(**{bank.lower(): digest})))
        if not values:
            raise TpmError("no digests to extend")
        if not 0 <= pcr < NUM_PCRS:
            raise TpmError(f"PCR index {pcr} out of range")
        await self._run(lambda ectx: ectx.pcr_extend(ESYS_TR(pcr), TPML_DIGEST_VALUES(values)))

    async def reset(self, pcr: int) -> None:
        """PCR_Reset (locality 0 may reset PCR 16 and 23 only)."""
        if not 0 <= pcr < NUM_PCRS:
            raise TpmError(f"PCR index {pcr} out of range")
        await self._run(lambda ectx: ectx.pcr_reset(ESYS_TR(pcr)))

    # -- quote ----------------------------------------------------------------------------------

    async def quote(
        self, ak: AttestationKey, *, nonce: bytes, pcrs: Iterable[int], bank: str, attempts: int = 5
    ) -> Quote:
        """TPM2_Quote over ``pcrs`` of one bank, with the PCR values that the quote covers.

        PCRs are read and then quoted in one locked sequence; if the quote's pcrDigest does not
        match the values read (an extend from another process slipped in between), try again.
        """
        if len(nonce) > tpm_ak.MAX_NONCE:
            raise TpmError(f"nonce longer than {tpm_ak.MAX_NONCE} bytes")
        sel_list = sorted(set(pcrs))
        selection(bank, sel_list)  # a bad selection fails before the TPM is asked
        return await self._run(lambda ectx: tpm_ak.quote_sync(ectx, ak, nonce, sel_list, bank, attempts))

    async def certify_self(self, ak: AttestationKey, qualifying_data: bytes) -> Certification:
        """TPM2_Certify of the AK by itself over ``qualifying_data`` (e.g. a verifier's challenge):
        proves this TPM holds the AK now."""
        if len(qualifying_data) > tpm_ak.MAX_NONCE:
            raise TpmError(f"challenge longer than {tpm_ak.MAX_NONCE} bytes")
        return await self._run(lambda ectx: tpm_ak.certify_sync(ectx, ak, qualifying_data))

    # -- credential activation -------------------------------------------------------------------

    async def activate_credential(self, ak: AttestationKey, ek: EndorsementKey, blob: bytes) -> bytes:
        """TPM2_ActivateCredential on a tpm2-tools format blob (0xBADCC0DE, 1, ID_OBJECT, SECRET)."""
        id_object, secret = tpm_ek.parse_credential(blob)
        return await self._run(lambda ectx: tpm_ek.activate_credential_sync(ectx, ak, ek, id_object, secret))
