"""What the verifier's attestation-round tests share: a software-signed steady-state reply, its
target and state, and fakes of the IMA and measured-boot hooks (no TPM)."""

from __future__ import annotations

import copy
from typing import Any

from keytrio.actors.verifier.attest import AgentTarget, AttestState
from keytrio.protocol import quote, tpm2
from keytrio.protocol.failures import Failure
from keytrio.protocol.quote import ClockInfo
from tests.protocol.quote_support import make_attest, pcr_values, sign_attest
from tests.protocol.tpm2_support import ak_public, key_pem, private_key

NONCE = "abcdefghij0123456789"
BANK = "sha256"
NK = key_pem(private_key("rsa2")).decode()
PREVIOUS = ClockInfo(90_000, 3, 1, 1)


def _pcrs(which: tuple[int, ...] = (0, 1, 2, 10, 16)) -> dict[int, bytes]:
    pcrs = pcr_values(BANK, list(which))
    if 16 in pcrs:
        pcrs[16] = tpm2.pcr16_binding_value(BANK, NK)
    return pcrs


GOOD_PCRS = _pcrs()


class FakeIma:
    """An ImaHook that records every call (for_boot included) and answers what it is told."""

    def __init__(self, answer: tuple[list[Failure], int] = ([], 7)) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer
        self.progress: Any = None

    def for_boot(self, boottime: int | None, reset_count: int | None) -> None:
        self.calls.append(("for_boot", boottime, reset_count))

    def progress_json(self) -> str:
        return "{}"

    def __call__(self, list_text: str | None, first_entry: int, pcrs: dict[int, bytes],
                 bank: str) -> tuple[list[Failure], int]:
        self.calls.append(("check", list_text, first_entry, dict(pcrs), bank))
        return copy.deepcopy(self.answer)


class FakeBoot:
    """A MeasuredBootCheck that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, log: bytes, pcrs: dict[int, bytes], bank: str, *, evaluate_policy: bool) -> list[Failure]:
        self.calls.append((log, sorted(pcrs), bank, evaluate_policy))
        return []


def _target(**changes: Any) -> AgentTarget:
    fields: dict[str, Any] = {
        "agent_id": "a1", "ip": "127.0.0.1", "port": 9002, "mtls_cert": "",
        "ak": tpm2.ak_key(ak_public("rsa").marshal()),
        "tpm_policy": {"mask": "0x1", "0": [GOOD_PCRS[0].hex().upper()], "1": ["00" * 32, GOOD_PCRS[1].hex()],
                       "16": ["ff" * 32]},
        "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
        "accept_tpm_signing_algs": ["ecschnorr", "rsassa"],
        "accept_tpm_encryption_algs": ["ecc", "rsa"],
        "ima_check": FakeIma(),
    }
    fields.update(changes)
    return AgentTarget(**fields)


def _state(**changes: Any) -> AttestState:
    fields: dict[str, Any] = {"clock": PREVIOUS, "nk_pem": NK, "boottime": 1000, "hash_alg": BANK,
                              "enc_alg": "rsa", "sign_alg": "rsassa", "ima_ml_entry": 5,
                              "quotes_received": 4, "attestation_count": 4}
    fields.update(changes)
    return AttestState(**fields)


def _quote_text(attest_raw: bytes, *, pcrs: dict[int, bytes] | None = None, kind: str = "rsa",
                sig_hash: str = BANK, blob_bank: str = BANK) -> str:
    pcrs = GOOD_PCRS if pcrs is None else pcrs
    return quote.build_quote(attest_raw, sign_attest(attest_raw, kind, sig_hash),
                             quote.encode_pcr_blob(blob_bank, pcrs))


def _good_attest(**kw: Any) -> bytes:
    kw.setdefault("nonce", NONCE.encode())
    kw.setdefault("pcrs", GOOD_PCRS)
    kw.setdefault("clock", (100_000, 3, 1, 1))
    return make_attest(bank=BANK, **kw)


def _reply(text: str | None = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"quote": _quote_text(_good_attest()) if text is None else text,
                           "hash_alg": BANK, "enc_alg": "rsa", "sign_alg": "rsassa", "boottime": 1000,
                           "ima_measurement_list": "10 aa ima-ng sha256:bb /x\n",
                           "ima_measurement_list_entry": 5}
    out.update(fields)
    return out
