"""Measured boot in push mode (API v3.0) on our verifier: a software push agent whose "machine"
booted a synthetic UEFI boot (testbed/boot_log.py: its binary event log, and PCR values that are
really the replay of that log), enrolled with the measured-boot reference state of the good boot
(``keytrio policy create measured-boot``'s code, protocol/mb_create.py). The verifier asks for the
uefi_log and the boot PCRs, and checks the log with the evidence core the pull monitor uses."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from trio.testing import MockClock

from keytrio.actors.verifier import records
from keytrio.protocol import eventlog_parse, mb_create
from keytrio.protocol import mb_policy as mbp
from keytrio.testbed import boot_log
from tests.actors.verifier.push_support import (
    PATHS,
    A,
    SoftAgent,
    policy_for,
    push_enrol_body,
    start,
    verdict,
)

BANK = "sha256"
GOOD = boot_log.BootConfig()


def refstate(cfg: boot_log.BootConfig) -> str:
    """The measured-boot policy made from the log of boot ``cfg`` (JSON text, as the tenant sends)."""
    return json.dumps(mb_create.refstate_from_log(eventlog_parse.parse(boot_log.build([BANK], cfg))))


@dataclass
class BootedAgent(SoftAgent):
    """A SoftAgent whose boot PCRs are the replay of its UEFI log, and which offers that log."""

    boot: boot_log.BootConfig = field(default_factory=boot_log.BootConfig)

    def uefi(self) -> bytes:
        return boot_log.build([BANK], self.boot)

    def capabilities(self) -> dict[str, Any]:
        doc = super().capabilities()
        doc["data"]["attributes"]["evidence_supported"].append(
            {"evidence_class": "log", "evidence_type": "uefi_log", "capabilities": {
                "entry_count": len(self.uefi()), "supports_partial_access": False, "appendable": False,
                "formats": ["application/octet-stream"]}})  # fmt: skip
        return doc

    def pcrs(self, selected: list[int]) -> dict[int, bytes]:
        values = super().pcrs(selected)
        booted = boot_log.expected_pcrs(BANK, self.boot)
        for p in selected:
            if p in mbp.MEASUREDBOOT_PCRS:
                values[p] = booted.get(p, bytes(32))  # a PCR the boot left alone is still zero
        return values

    def evidence(self, requested: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        logs = [w for w in requested if w["evidence_type"] != "uefi_log"]
        doc = super().evidence(logs, **kw)
        items = doc["data"]["attributes"]["evidence_collected"]
        for i, want in enumerate(requested):
            if want["evidence_type"] == "uefi_log":
                raw = self.uefi()
                items.insert(i, {"evidence_class": "log", "evidence_type": "uefi_log", "data": {
                    "entry_count": len(raw), "entries": base64.b64encode(raw).decode()}})
        return doc


async def _enrolled(rv: Any, pki: Any, boot: boot_log.BootConfig) -> BootedAgent:
    await rv.call("POST", f"/agents/{A}", push_enrol_body("rsa", policy_for(PATHS), mb_policy=refstate(GOOD),
                                                          mb_policy_name="good-boot"))
    host, port = rv.verifier.address
    base = SoftAgent.make(A, "rsa", host, port, pki.ca, PATHS)
    a = BootedAgent(base.agent_id, base.kind, base.base, base.client, base.entries, boot=boot)
    resp = await a.open_session()
    assert resp.status_code == 200 and a.token, resp.text
    return a


async def test_push_agent_with_the_good_boot_passes_measured_boot(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    a = await _enrolled(rv, pki, GOOD)
    caps = await a.post_capabilities()
    assert caps.status_code == 201, caps.text
    requested = caps.json()["data"]["attributes"]["evidence_requested"]
    # the mb policy makes the verifier ask for the whole UEFI log and quote the boot PCRs
    assert [w["evidence_type"] for w in requested] == ["tpm_quote", "ima_log", "uefi_log"]
    assert requested[2]["chosen_parameters"] == {"starting_offset": 0, "format": "application/octet-stream"}
    assert set(mbp.MEASUREDBOOT_PCRS) <= set(requested[0]["chosen_parameters"]["selected_subjects"][BANK])
    resp = await a.send_evidence(a.evidence(requested))
    assert resp.status_code == 202, resp.text
    done = await verdict(rv, A, 0)
    assert done["attributes"]["evaluation"] == "pass", done
    rec = await rv.get(A)
    assert rec is not None and rec["operational_state"] == records.GET_QUOTE and rec["attestation_count"] == 1
    await rv.stop()


async def test_push_agent_whose_boot_breaks_the_policy_fails_measured_boot(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start(nursery, tmp_path, pki, clock)
    # an unknown kernel: the log is genuine (it replays to the quoted PCRs), the policy refuses it
    a = await _enrolled(rv, pki, GOOD.tampered("unknown_kernel"))
    caps = await a.post_capabilities()
    assert caps.status_code == 201, caps.text
    resp = await a.send_evidence(a.evidence(caps.json()["data"]["attributes"]["evidence_requested"]))
    assert resp.status_code == 202, resp.text
    done = await verdict(rv, A, 0)
    assert done["attributes"]["evaluation"] == "fail", done
    assert done["attributes"]["failure_reason"] == "policy_violation"
    rec = await rv.get(A)
    assert rec is not None and rec["operational_state"] == records.INVALID_QUOTE
    assert rec["last_event_id"] == "measured_boot.boot_application_not_allowed", rec["last_event_id"]
    await rv.stop()
