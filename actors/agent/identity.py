"""The agent's TPM identity at start: EK (+ cert), AK (kept across restarts), agent id, PCR 16.

The AK's public/private blobs live in ``data_dir/ak.json`` together with the EK public they were
created under; they are reloaded with Tpm.load_ak, so a restarted agent presents the same AK (and
the registrar sees the same identity). A saved AK that does not fit (other EK: a new TPM; other
hash or signing algorithm in the config) is replaced by a new one, logged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio
from cryptography.hazmat.primitives import serialization

from keytrio.actors.agent import datadir
from keytrio.actors.agent.tpm import AttestationKey, EndorsementKey, Tpm, TpmError, public_key
from keytrio.actors.agent.tpm_core import AkAlg, EkAlg
from keytrio.protocol import tpm2, validation

log = logging.getLogger("keytrio.agent")

_EK_ALG: dict[str, EkAlg] = {"rsa": "rsa2048", "ecc": "ecc384"}  # swtpm/TCG default EKs with certificates
_AK_ALG: dict[str, AkAlg] = {"rsassa": "rsa", "ecdsa": "ecc"}


@dataclass(frozen=True)
class Identity:
    ek: EndorsementKey
    ak: AttestationKey
    agent_id: str
    enc_alg: str  # of the AK, Keylime's names
    sign_alg: str
    hash_alg: str


def ek_pem(ek: EndorsementKey) -> str:
    """SubjectPublicKeyInfo PEM of the EK (what ``uuid = hash_ek`` hashes)."""
    return public_key(ek.public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def hash_ek_id(ek: EndorsementKey) -> str:
    """``uuid = hash_ek``: SHA-256 hex of the EK public key's SubjectPublicKeyInfo PEM text
    (the upstream Rust agent hashes the same PEM)."""
    return hashlib.sha256(ek_pem(ek).encode("ascii")).hexdigest()


async def setup(
    tpm: Tpm,
    data_dir: Path,
    *,
    uuid_setting: str,
    ek_handle: Literal["generate"] | int,
    encryption_alg: str,
    signing_alg: str,
    hash_alg: str,
) -> Identity:
    ek = await tpm.endorsement_key(alg=_EK_ALG[encryption_alg], handle=ek_handle)
    ak = await _load_or_create_ak(tpm, ek, data_dir, _AK_ALG[signing_alg], hash_alg)
    if uuid_setting == "generate":
        agent_id = await trio.to_thread.run_sync(datadir.generated_uuid, data_dir)
    elif uuid_setting == "hash_ek":
        agent_id = hash_ek_id(ek)
    else:
        # the registrar keys its record (and the activation HMAC) by the normalised id
        agent_id = validation.agent_id(uuid_setting, "uuid")
    enc, sign, halg = tpm2.key_algorithms(ak.public)
    return Identity(ek, ak, agent_id, enc, sign, halg)


async def _load_or_create_ak(
    tpm: Tpm, ek: EndorsementKey, data_dir: Path, alg: AkAlg, hash_alg: str
) -> AttestationKey:
    path = data_dir / datadir.AK_FILE
    saved = await trio.to_thread.run_sync(datadir.read_json, path)
    ek_b64 = base64.b64encode(ek.public).decode("ascii")
    if isinstance(saved, dict):
        if saved.get("ek") != ek_b64:
            log.warning("event=ak_recreated reason=saved AK belongs to another EK (a different TPM)")
        elif saved.get("alg") != alg or saved.get("hash_alg") != hash_alg:
            log.warning("event=ak_recreated reason=saved AK is %s/%s, configured %s/%s",
                        saved.get("alg"), saved.get("hash_alg"), alg, hash_alg)
        else:
            try:
                return await tpm.load_ak(
                    ek, base64.b64decode(saved["public"]), base64.b64decode(saved["private"])
                )
            except (TpmError, KeyError, ValueError) as exc:
                log.warning("event=ak_recreated reason=saved AK does not load (%s)", exc)
    ak = await tpm.create_ak(ek, alg=alg, hash_alg=hash_alg)
    record = {
        "ek": ek_b64,
        "alg": alg,
        "hash_alg": hash_alg,
        "public": base64.b64encode(ak.public).decode("ascii"),
        "private": base64.b64encode(ak.private).decode("ascii"),
    }
    await trio.to_thread.run_sync(datadir.write_json, path, record)
    return ak


async def bind_nk(tpm: Tpm, nk_pem: str) -> list[str]:
    """Reset PCR 16 and extend it with H(NK PEM text) in every active bank; returns the banks."""
    banks = await tpm.active_banks()
    await tpm.reset(16)
    digests = {bank: hashlib.new(bank, nk_pem.encode("utf-8")).digest() for bank in banks if bank in tpm2.HASH_ALGS}
    if digests:
        await tpm.extend(16, digests)
    return list(digests)
