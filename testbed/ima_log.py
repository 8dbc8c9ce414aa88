"""The simulated machine's IMA: writes ascii_runtime_measurements and extends PCR 10 for real.

Every record is appended to the file (and flushed) *before* PCR 10 is extended in each active
bank, as the kernel does: a reader may see the log ahead of the PCR, never behind. One lock
serialises records so the file order is the extend order even when measurements run
concurrently. Entries are built with protocol.ima, so the file is exactly what the verifier parses.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import trio

from keytrio.protocol import ima, tpm2
from keytrio.protocol.ima import Entry

#: ``extend(pcr, {bank: digest})``, e.g. actors.agent.tpm.Tpm.extend.
ExtendFn = Callable[[int, dict[str, bytes]], Awaitable[None]]

FILE_NAME = "ascii_runtime_measurements"


class ImaLog:
    """IMA measurement list of one simulated machine (one boot)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        extend: ExtendFn,
        banks: Sequence[str],
        *,
        ima_hash_alg: str = "sha256",
        template_hash_alg: str = "sha1",
        pcr: int = ima.IMA_PCR,
    ) -> None:
        unknown = [b for b in banks if b not in tpm2.DIGEST_SIZES]
        if unknown:
            raise ValueError(f"unsupported PCR banks {unknown}")
        self.path = Path(path)
        self.banks = list(banks)
        self.ima_hash_alg = ima_hash_alg  # the kernel's ima_hash= (file digests, boot_aggregate bank)
        self.template_hash_alg = template_hash_alg  # the template-hash column (log_hash_alg)
        self.pcr = pcr
        self.entries: list[Entry] = []
        self._extend = extend
        self._lock = trio.Lock()
        self._fresh = True  # the first record of this boot starts a new file

    # --- reading -------------------------------------------------------------------------------

    def lines(self) -> list[str]:
        return [ima.format_line(e) for e in self.entries]

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines())

    def __len__(self) -> int:
        return len(self.entries)

    # --- recording -----------------------------------------------------------------------------

    def _append(self, data: bytes, fresh: bool) -> None:
        with open(self.path, "wb" if fresh else "ab") as f:
            f.write(data)
            f.flush()

    async def record(self, entry: Entry) -> Entry:
        """Append ``entry``'s line, then extend PCR ``pcr`` of every bank with its digest."""
        digests = {bank: ima.extend_digest(entry, bank) for bank in self.banks}
        data = (ima.format_line(entry) + "\n").encode("utf-8", "surrogateescape")
        async with self._lock:
            # Not cancellable once started: a half-written line would corrupt the list.
            await trio.to_thread.run_sync(self._append, data, self._fresh)
            self._fresh = False
            self.entries.append(entry)
            await self._extend(self.pcr, digests)
        return entry

    async def boot_aggregate(
        self, pcr_values: Mapping[str, Mapping[int, bytes]], *, pcrs_8_9: bool = False
    ) -> Entry:
        """The first line: aggregate of PCRs 0-7 (0-9) in the ima_hash_alg bank, else SHA-1.

        ``pcr_values``: ``{bank: {pcr: value}}`` as read from the TPM.
        """
        if self.entries:
            raise RuntimeError("boot_aggregate must be the first entry of a boot")
        bank = self.ima_hash_alg if self.ima_hash_alg in pcr_values else "sha1"
        entry = ima.boot_aggregate_entry(
            bank, pcr_values[bank], pcrs_8_9=pcrs_8_9, template_hash_alg=self.template_hash_alg
        )
        return await self.record(entry)

    async def measure(
        self,
        path: str,
        content: bytes,
        *,
        template: str = "ima-ng",
        digest_alg: str | None = None,
        signature: bytes | None = None,
    ) -> Entry:
        """Measure a file with this content (digest with ``digest_alg``, default ima_hash_alg)."""
        alg = "sha1" if template == "ima" and digest_alg is None else digest_alg or self.ima_hash_alg
        digest = hashlib.new(alg, content).digest()
        return await self.measure_digest(path, alg, digest, template=template, signature=signature)

    async def measure_digest(
        self,
        path: str,
        digest_alg: str,
        digest: bytes,
        *,
        template: str = "ima-ng",
        signature: bytes | None = None,
    ) -> Entry:
        entry = ima.build_entry(
            template,
            path,
            digest_alg,
            digest,
            signature=signature,
            template_hash_alg=self.template_hash_alg,
            pcr=self.pcr,
        )
        return await self.record(entry)

    async def tomtou(self, path: str) -> Entry:
        """A ToMToU / open-writers violation: zero template hash, PCR extended with 0xff..ff."""
        entry = ima.violation_entry(
            path, digest_alg=self.ima_hash_alg, template_hash_alg=self.template_hash_alg, pcr=self.pcr
        )
        return await self.record(entry)

    async def buf(self, name: str, data: bytes, *, digest_alg: str | None = None) -> Entry:
        """An ima-buf entry (e.g. a key or a kernel command line) carrying ``data``."""
        alg = digest_alg or self.ima_hash_alg
        entry = ima.build_entry(
            "ima-buf",
            name,
            alg,
            hashlib.new(alg, data).digest(),
            buf=data,
            template_hash_alg=self.template_hash_alg,
            pcr=self.pcr,
        )
        return await self.record(entry)
