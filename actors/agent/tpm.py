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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HC,
    TPM2_SE,
    TPM2_SU,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_HA,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_HA,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template, tools_to_credential

__all__ = [
    "EK_CERT_INDEX",
    "AttestationKey",
    "EndorsementKey",
    "Quote",
    "Tpm",
    "TpmError",
    "public_key",
]

T = TypeVar("T")

EkAlg = Literal["rsa2048", "ecc384"]
AkAlg = Literal["rsa", "ecc"]

# TCG EK Credential Profile: EK certificate NV indices and the matching default templates
# (low range for RSA-2048, high range for ECC P-384).
EK_CERT_INDEX: dict[str, int] = {"rsa2048": 0x01C00002, "ecc384": 0x01C00016}
_EK_TEMPLATE_NAME = {"rsa2048": "EK-RSA2048", "ecc384": "EK-HIGH-ECC384"}

_HASH_ALGS: dict[str, TPM2_ALG] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}
_ALG_NAMES = {int(v): k for k, v in _HASH_ALGS.items()}
_PCR_READ_MAX = 8  # TPM2_PCR_Read returns at most 8 digests per call
_NUM_PCRS = 24
_MAX_NONCE = 64  # TPM2B_DATA in TPM2_Quote


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


def public_key(public: bytes) -> PublicKeyTypes:
    """A cryptography public key from a marshalled TPM2B_PUBLIC (EK or AK)."""
    pub, _ = TPM2B_PUBLIC.unmarshal(public)
    return serialization.load_der_public_key(pub.publicArea.to_der())


def _hash_alg(name: str) -> TPM2_ALG:
    try:
        return _HASH_ALGS[name.lower()]
    except KeyError:
        raise TpmError(f"unsupported hash algorithm {name!r}") from None


def _ak_template(alg: str, hash_alg: str) -> TPM2B_PUBLIC:
    halg = _hash_alg(hash_alg)
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


def _selection(bank: str, pcrs: Iterable[int]) -> TPML_PCR_SELECTION:
    pcrs = sorted(set(pcrs))
    if not pcrs:
        raise TpmError("empty PCR selection")
    if any(not 0 <= p < _NUM_PCRS for p in pcrs):
        raise TpmError(f"PCR index out of range in {pcrs}")
    _hash_alg(bank)
    return TPML_PCR_SELECTION.parse(f"{bank.lower()}:{','.join(map(str, pcrs))}")


def _selected(sel: TPML_PCR_SELECTION) -> list[int]:
    """PCR indices (ascending) selected in the first (only) bank of a selection."""
    if sel.count == 0:
        return []
    s = sel.pcrSelections[0]
    bitmap = bytes(s.pcrSelect)[: s.sizeofSelect]
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


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
                    _flush_transients(ectx)
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
                if any(bytes(s.pcrSelect)[: s.sizeofSelect]) and int(s.hash) in _ALG_NAMES:
                    out.append(_ALG_NAMES[int(s.hash)])
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

        def _ek(ectx: ESAPI) -> EndorsementKey:
            nv_read = _NvReader(ectx)
            cert: bytes | None
            if handle == "generate":
                try:
                    cert, template = create_ek_template(_EK_TEMPLATE_NAME[alg], nv_read)
                except ValueError as e:  # a high-range template needs its certificate present
                    raise TpmError(f"no EK template for {alg}: {e}") from e
                h, pub, _, _, _ = ectx.create_primary(
                    TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
                )
                self._owned.add(int(h))
                persistent = False
            else:
                h = ectx.tr_from_tpmpublic(handle)
                pub, _, _ = ectx.read_public(h)
                cert = _read_nv_or_none(nv_read, EK_CERT_INDEX[alg])
                persistent = True
            name = bytes(ectx.tr_get_name(h))
            return EndorsementKey(h, alg, pub.marshal(), name, cert, persistent)

        return await self._run(_ek)

    # -- attestation key ------------------------------------------------------------------------

    async def create_ak(
        self, ek: EndorsementKey, *, alg: AkAlg = "rsa", hash_alg: str = "sha256"
    ) -> AttestationKey:
        """Create and load a restricted signing key under the EK (RSA-2048 RSASSA or P-256 ECDSA)."""
        template = _ak_template(alg, hash_alg)

        def _create(ectx: ESAPI) -> AttestationKey:
            with _ek_auth(ectx, ek) as sess:
                priv, pub, _, _, _ = ectx.create(ek.handle, TPM2B_SENSITIVE_CREATE(), template, session1=sess)
            return self._load_ak_sync(ectx, ek, pub, priv, alg, hash_alg)

        return await self._run(_create)

    async def load_ak(self, ek: EndorsementKey, public: bytes, private: bytes) -> AttestationKey:
        """Reload an AK from its saved public/private blobs (same EK, so same seed): same name."""
        pub, _ = TPM2B_PUBLIC.unmarshal(public)
        priv, _ = TPM2B_PRIVATE.unmarshal(private)
        area = pub.publicArea
        if area.type == TPM2_ALG.RSA:
            alg, halg = "rsa", area.parameters.rsaDetail.scheme.details.anySig.hashAlg
        elif area.type == TPM2_ALG.ECC:
            alg, halg = "ecc", area.parameters.eccDetail.scheme.details.anySig.hashAlg
        else:
            raise TpmError("AK public area is neither RSA nor ECC")
        hash_alg = _ALG_NAMES.get(int(halg))
        if hash_alg is None:
            raise TpmError(f"AK signing hash {halg} is not supported")
        return await self._run(lambda ectx: self._load_ak_sync(ectx, ek, pub, priv, alg, hash_alg))

    def _load_ak_sync(
        self,
        ectx: ESAPI,
        ek: EndorsementKey,
        pub: TPM2B_PUBLIC,
        priv: TPM2B_PRIVATE,
        alg: str,
        hash_alg: str,
    ) -> AttestationKey:
        with _ek_auth(ectx, ek) as sess:
            h = ectx.load(ek.handle, priv, pub, session1=sess)
        self._owned.add(int(h))
        name = bytes(ectx.tr_get_name(h))
        return AttestationKey(h, alg, hash_alg, pub.marshal(), priv.marshal(), name)

    async def persist(self, key: AttestationKey | EndorsementKey, persistent_handle: int) -> ESYS_TR:
        """EvictControl a loaded key to ``persistent_handle`` (owner auth); returns its ESYS handle."""

        def _persist(ectx: ESAPI) -> ESYS_TR:
            return ectx.evict_control(ESYS_TR.OWNER, key.handle, persistent_handle)

        return await self._run(_persist)

    # -- PCRs -----------------------------------------------------------------------------------

    async def read_pcrs(self, bank: str, pcrs: Iterable[int]) -> dict[int, bytes]:
        sel = sorted(set(pcrs))
        return await self._run(lambda ectx: _read_pcrs_sync(ectx, bank, sel))

    async def extend(self, pcr: int, digests: dict[str, bytes]) -> None:
        """PCR_Extend ``pcr`` with one digest per bank (banks not given are left alone)."""
        values = []
        for bank, digest in digests.items():
            alg = _hash_alg(bank)
            if len(digest) != hashlib.new(bank.lower()).digest_size:
                raise TpmError(f"{bank} digest must be {hashlib.new(bank.lower()).digest_size} bytes")
            values.append(TPMT_HA(hashAlg=alg, digest=TPMU_HA(**{bank.lower(): digest})))
        if not values:
            raise TpmError("no digests to extend")
        if not 0 <= pcr < _NUM_PCRS:
            raise TpmError(f"PCR index {pcr} out of range")
        await self._run(lambda ectx: ectx.pcr_extend(ESYS_TR(pcr), TPML_DIGEST_VALUES(values)))

    async def reset(self, pcr: int) -> None:
        """PCR_Reset (locality 0 may reset PCR 16 and 23 only)."""
        if not 0 <= pcr < _NUM_PCRS:
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
        if len(nonce) > _MAX_NONCE:
            raise TpmError(f"nonce longer than {_MAX_NONCE} bytes")
        sel_list = sorted(set(pcrs))
        selection = _selection(bank, sel_list)

        def _quote(ectx: ESAPI) -> Quote:
            for _ in range(attempts):
                values = _read_pcrs_sync(ectx, bank, sel_list)
                quoted, sig = ectx.quote(ak.handle, selection, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
                attest = bytes(quoted)
                info, _ = TPMS_ATTEST.unmarshal(attest)
                # pcrDigest uses the signing scheme's hash, not the bank's
                digest = hashlib.new(ak.hash_alg, b"".join(values[i] for i in sel_list)).digest()
                if bytes(info.attested.quote.pcrDigest) == digest:
                    return Quote(attest, sig.marshal(), bank.lower(), values, nonce)
            raise TpmError(f"PCRs kept changing during {attempts} quote attempts")

        return await self._run(_quote)

    # -- credential activation -------------------------------------------------------------------

    async def activate_credential(self, ak: AttestationKey, ek: EndorsementKey, blob: bytes) -> bytes:
        """TPM2_ActivateCredential on a tpm2-tools format blob (0xBADCC0DE, 1, ID_OBJECT, SECRET)."""
        try:
            id_object, secret = tools_to_credential(blob)
        except (ValueError, IndexError, TypeError) as e:
            raise TpmError(f"malformed credential blob: {e}") from e

        def _activate(ectx: ESAPI) -> bytes:
            with _ek_auth(ectx, ek) as sess:
                cred = ectx.activate_credential(
                    ak.handle, ek.handle, id_object, secret, session1=ESYS_TR.PASSWORD, session2=sess
                )
            return bytes(cred)

        return await self._run(_activate)


# ----------------------------------------------------------------------------------------------
# sync helpers (run inside the worker thread)
# ----------------------------------------------------------------------------------------------


def _read_pcrs_sync(ectx: ESAPI, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    """PCR_Read in chunks of 8; fails if the bank is inactive (the TPM returns no digests)."""
    _selection(bank, pcrs)  # validate
    out: dict[int, bytes] = {}
    for i in range(0, len(pcrs), _PCR_READ_MAX):
        chunk = pcrs[i : i + _PCR_READ_MAX]
        _, sel_out, digests = ectx.pcr_read(_selection(bank, chunk))
        got = _selected(sel_out)
        if got != chunk or len(digests) != len(chunk):
            raise TpmError(f"TPM returned PCRs {got} of {bank} for requested {chunk} (inactive bank?)")
        for idx, d in zip(chunk, digests, strict=True):
            out[idx] = bytes(d)
    return out


class _NvReader:
    """NV read callback for create_ek_template that checks the defined indices first.

    Probing absent indices through TR_FromTPMPublic works too, but libtss2 then prints ESYS
    errors on stderr for every miss; one GetCapability avoids that noise.
    """

    def __init__(self, ectx: ESAPI) -> None:
        self._read = NVReadEK(ectx)
        self._defined: set[int] = set()
        start, more = int(TPM2_HC.NV_INDEX_FIRST), True
        while more:
            more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
            got = [int(h) for h in data.data.handles]
            if not got:
                break
            self._defined.update(got)
            start = got[-1] + 1

    def __call__(self, index: int) -> bytes:
        if int(index) not in self._defined:
            raise NoSuchIndex(index)
        return self._read(index)


def _read_nv_or_none(nv_read: _NvReader, index: int) -> bytes | None:
    try:
        return nv_read(index)
    except NoSuchIndex:
        return None


class _ek_auth:
    """Authorization for using the EK (USER role) as a context manager yielding a session handle.

    Low-range EK templates have no userWithAuth: they need a policy session satisfying
    PolicySecret(TPM_RH_ENDORSEMENT). High-range templates (the P-384 EK) set userWithAuth and have
    an empty authValue, so a password session satisfies USER role (their authPolicy, a PolicyOR, is
    only needed for ADMIN role). The policy session is flushed afterwards.
    """

    def __init__(self, ectx: ESAPI, ek: EndorsementKey) -> None:
        self._ectx = ectx
        pub, _ = TPM2B_PUBLIC.unmarshal(ek.public)
        self._user_with_auth = bool(pub.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH)
        self._name_alg = pub.publicArea.nameAlg
        self._session: ESYS_TR | None = None

    def __enter__(self) -> ESYS_TR:
        if self._user_with_auth:
            return ESYS_TR.PASSWORD
        ectx = self._ectx
        sess = ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), self._name_alg
        )
        self._session = sess
        try:
            ectx.policy_secret(ESYS_TR.ENDORSEMENT, sess, b"", b"", b"", 0)
        except BaseException:
            self._flush()
            raise
        return sess

    def _flush(self) -> None:
        if self._session is not None:
            try:
                self._ectx.flush_context(self._session)
            except TSS2_Exception:
                pass  # the TPM already dropped it (sessions without continueSession end on use)
            self._session = None

    def __exit__(self, *exc: object) -> None:
        self._flush()


def _flush_transients(ectx: ESAPI) -> None:
    """Flush transient objects left loaded by earlier clients (no resource manager on swtpm)."""
    more = True
    handles: list[int] = []
    start = int(TPM2_HC.TRANSIENT_FIRST)
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
        got = [int(h) for h in data.data.handles]
        handles += got
        if not got:
            break
        start = got[-1] + 1
    for h in handles:
        try:
            tr = ectx.tr_from_tpmpublic(h)
            ectx.flush_context(tr)
        except TSS2_Exception:
            pass  # raced with another flush, or not readable: nothing to free

