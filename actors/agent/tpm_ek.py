"""The endorsement key: created from the TCG templates (or read at a persistent handle) with its
certificate from NV, the EK's authorization session, and credential activation (which proves to
the registrar that the AK lives in the TPM of this EK).

Blocking ESAPI code, run by :class:`actors.agent.tpm.Tpm` in its worker thread.
"""

from __future__ import annotations

from typing import Literal

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_HC, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SYM_DEF
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template, tools_to_credential

from keytrio.actors.agent.tpm_core import AttestationKey, EndorsementKey, TpmError, handles_sync

# TCG EK Credential Profile: EK certificate NV indices and the matching default templates
# (low range for RSA-2048, high range for ECC P-384).
EK_CERT_INDEX: dict[str, int] = {"rsa2048": 0x01C00002, "ecc384": 0x01C00016}
_EK_TEMPLATE_NAME = {"rsa2048": "EK-RSA2048", "ecc384": "EK-HIGH-ECC384"}


def endorsement_key_sync(
    ectx: ESAPI, alg: str, handle: Literal["generate"] | int, owned: set[int]
) -> EndorsementKey:
    """The EK of ``alg`` (generated handles are added to ``owned``: the caller flushes them)."""
    nv_read = _NvReader(ectx)
    cert: bytes | None
    if handle == "generate":
        try:
            cert, template = create_ek_template(_EK_TEMPLATE_NAME[alg], nv_read)
        except ValueError as e:  # a high-range template needs its certificate present
            raise TpmError(f"no EK template for {alg}: {e}") from e
        h, pub, _, _, _ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        owned.add(int(h))
        persistent = False
    else:
        h = ectx.tr_from_tpmpublic(handle)
        pub, _, _ = ectx.read_public(h)
        cert = _read_nv_or_none(nv_read, EK_CERT_INDEX[alg])
        persistent = True
    name = bytes(ectx.tr_get_name(h))
    return EndorsementKey(h, alg, pub.marshal(), name, cert, persistent)


def parse_credential(blob: bytes) -> tuple[object, object]:
    """(ID_OBJECT, SECRET) of a tpm2-tools format blob (0xBADCC0DE, 1, ID_OBJECT, SECRET)."""
    try:
        return tools_to_credential(blob)
    except (ValueError, IndexError, TypeError) as e:
        raise TpmError(f"malformed credential blob: {e}") from e


def activate_credential_sync(
    ectx: ESAPI, ak: AttestationKey, ek: EndorsementKey, id_object: object, secret: object
) -> bytes:
    """TPM2_ActivateCredential: the secret the registrar bound to ``ak``'s name and ``ek``."""
    with ek_auth(ectx, ek) as sess:
        cred = ectx.activate_credential(
            ak.handle, ek.handle, id_object, secret, session1=ESYS_TR.PASSWORD, session2=sess
        )
    return bytes(cred)


class _NvReader:
    """NV read callback for create_ek_template that checks the defined indices first.

    Probing absent indices through TR_FromTPMPublic works too, but libtss2 then prints ESYS
    errors on stderr for every miss; one GetCapability avoids that noise.
    """

    def __init__(self, ectx: ESAPI) -> None:
        self._read = NVReadEK(ectx)
        self._defined: set[int] = set(handles_sync(ectx, int(TPM2_HC.NV_INDEX_FIRST)))

    def __call__(self, index: int) -> bytes:
        if int(index) not in self._defined:
            raise NoSuchIndex(index)
        return self._read(index)


def _read_nv_or_none(nv_read: _NvReader, index: int) -> bytes | None:
    try:
        return nv_read(index)
    except NoSuchIndex:
        return None


class ek_auth:  # lower case: used like a function, ``with ek_auth(ectx, ek) as session``
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
