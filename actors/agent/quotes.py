"""Identity and integrity quotes (PROTOCOL.md "Agent"): TPM quote, then logs, in that order.

The TPM layer reads the PCRs and quotes in one locked sequence and retries if the quote's
pcrDigest does not match the values read. The IMA list is read *after* the quote, so the list
may run ahead of the quoted PCR 10 (the verifier handles that), never behind it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from keytrio.actors.agent.tpm import AttestationKey, Tpm
from keytrio.actors.common.metrics import Metrics
from keytrio.protocol.ima import IMA_PCR
from keytrio.protocol.quote import build_quote, encode_pcr_blob
from keytrio.protocol.quote_check import PCR_16
from keytrio.protocol.wire import BootLog, IdentityQuote, ImaTail, IntegrityQuote

log = logging.getLogger("keytrio.agent")

PCR_BOOT = 0  # asking for it asks for the UEFI event log too


class AgentMetrics:
    """The agent's Prometheus metrics; one per Agent (own registry: agents in one process count apart)."""

    def __init__(self) -> None:
        m = self.metrics = Metrics("agent")
        self.quotes = m.counter("quotes_total", "Quotes served by kind (identity, integrity) and result (ok, error).",
                                ("kind", "result"))
        self.tpm_seconds = m.histogram("tpm_seconds", "Latency of TPM operations the agent makes, by operation "
                                       "(quote = PCR read + quote, activate_credential).", ("op",))
        self.keys = m.counter("keys_total", "U/V key halves received, by half (u, v) and result "
                              "(stored, derived = K complete, refused).", ("half", "result"))
        self.payloads = m.counter("payloads_total", "Payloads decrypted and unpacked into secure_dir.")
        self.notices = m.counter("notices_total", "Revocation notices received, by result "
                                 "(handled, duplicate, refused, invalid).", ("result",))


def read_boottime(source: Path) -> int:
    """Boot time (epoch seconds): the ``btime`` line of /proc/stat, or a file holding an integer."""
    text = source.read_text("ascii", errors="replace")
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "btime" and parts[1].isdigit():
            return int(parts[1])
    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    raise ValueError(f"{source}: no boot time found")


def ima_tail(text: str, entry: int) -> tuple[str, int]:
    """(lines from ``entry`` on, the entry number they start at), PROTOCOL.md's rules.

    entry == number of lines -> empty list at that entry; entry beyond the end (the log was
    reset, e.g. by a reboot) -> the whole list from entry 0.
    """
    # Only complete lines count: a line without its newline may still be being written.
    lines = [line + "\n" for line in text.split("\n")[:-1]]
    if entry > len(lines):
        entry = 0
    return "".join(lines[entry:]), entry


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


@dataclass(frozen=True)
class QuoteSource:
    tpm: Tpm
    ak: AttestationKey
    hash_alg: str
    enc_alg: str
    sign_alg: str
    nk_pem: str
    boottime_source: Path
    ima_ml_path: Path
    measuredboot_ml_path: Path
    metrics: AgentMetrics | None = None

    async def _quote(self, nonce: str, pcrs: set[int]) -> str:
        pcrs = set(pcrs) | {PCR_16}
        start = trio.current_time()
        try:
            q = await self.tpm.quote(self.ak, nonce=nonce.encode("ascii"), pcrs=pcrs, bank=self.hash_alg)
        finally:
            if self.metrics is not None:
                self.metrics.tpm_seconds.labels("quote").observe(trio.current_time() - start)
        return build_quote(q.attest, q.signature, encode_pcr_blob(q.bank, q.pcrs))

    async def _boottime(self) -> int:
        return await trio.to_thread.run_sync(read_boottime, self.boottime_source)

    async def identity(self, nonce: str) -> IdentityQuote:
        quote = await self._quote(nonce, {PCR_16})
        return IdentityQuote(quote, self.hash_alg, self.enc_alg, self.sign_alg, self.nk_pem,
                             boottime=await self._boottime())

    async def integrity(self, nonce: str, pcrs: list[int], partial: bool, ima_entry: int) -> IntegrityQuote:
        quote = await self._quote(nonce, set(pcrs))
        boottime = await self._boottime()
        ima = mb = None
        if IMA_PCR in pcrs:
            # after the quote: the list may be ahead of the quoted PCR 10, never behind
            try:
                raw = await trio.to_thread.run_sync(_read_bytes, self.ima_ml_path)
            except FileNotFoundError:
                ima = ImaTail(None, 0)  # no IMA on this machine: null, as upstream's agent says it
            else:
                # undecodable path bytes become U+FFFD; JSON carries text only
                ima = ImaTail(*ima_tail(raw.decode("utf-8", "replace"), ima_entry))
        if PCR_BOOT in pcrs:
            try:
                mb = BootLog.of(await trio.to_thread.run_sync(_read_bytes, self.measuredboot_ml_path))
            except FileNotFoundError:
                mb = BootLog(None)
        return IntegrityQuote(quote, self.hash_alg, self.enc_alg, self.sign_alg,
                              pubkey=None if partial else self.nk_pem, boottime=boottime, ima=ima, mb=mb)
