"""What the push agent measures and sends: capabilities, then the quote and the logs requested.

The quote covers exactly the PCRs and the challenge the verifier chose (no PCR 16: push mode has
no NK to bind). The IMA log is read after the quote, so it may run ahead of the quoted PCR 10
(the verifier replays only as far as it needs), never behind it; only complete lines count, and
the capability's ``entry_count`` is the same count, so the lines sent from the requested offset
are never fewer than the verifier expects from it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trio

from keytrio.actors.agent.push_messages import Capabilities, Collected, Requested
from keytrio.actors.agent.quotes import read_boottime
from keytrio.actors.agent.tpm import AttestationKey, Certification, Tpm, public_key
from keytrio.protocol import pcr_blob

_SCHEMES = {"rsa": "rsassa", "ecc": "ecdsa"}


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def complete_lines(raw: bytes) -> list[str]:
    """The IMA list's complete lines (a last line without its newline may still be being written)."""
    text = raw.decode("utf-8", "replace")  # JSON carries text only; odd path bytes become U+FFFD
    return [line + "\n" for line in text.split("\n")[:-1]]


@dataclass(frozen=True)
class EvidenceSource:
    tpm: Tpm
    ak: AttestationKey
    hash_alg: str
    boottime_source: Path
    ima_ml_path: Path
    measuredboot_ml_path: Path

    async def certify(self, challenge: bytes) -> Certification:
        return await self.tpm.certify_self(self.ak, challenge)

    async def capabilities(self) -> Capabilities:
        boot = await trio.to_thread.run_sync(read_boottime, self.boottime_source)
        ima = await trio.to_thread.run_sync(_read, self.ima_ml_path)
        uefi = await trio.to_thread.run_sync(_read, self.measuredboot_ml_path)
        return Capabilities(
            ak_public=self.ak.public,
            hash_alg=self.hash_alg,
            sign_scheme=_SCHEMES[self.ak.alg],
            key_alg=self.ak.alg,
            key_size=public_key(self.ak.public).key_size,
            boot_time=datetime.datetime.fromtimestamp(boot, datetime.UTC),
            ima_entries=len(complete_lines(ima)) if ima is not None else None,
            uefi_size=len(uefi) if uefi else None,
        )

    async def collect(self, requested: Requested) -> Collected:
        q = requested.quote
        quote = await self.tpm.quote(self.ak, nonce=q.challenge, pcrs=q.pcrs, bank=q.hash_alg)
        ima_lines = ""
        if "ima_log" in requested.items:
            raw = await trio.to_thread.run_sync(_read, self.ima_ml_path)
            ima_lines = "".join(complete_lines(raw or b"")[requested.ima_offset:])
        uefi = b""
        if "uefi_log" in requested.items:
            uefi = await trio.to_thread.run_sync(_read, self.measuredboot_ml_path) or b""
        return Collected(quote.attest, quote.signature, pcr_blob.encode({quote.bank: quote.pcrs}), ima_lines, uefi)
