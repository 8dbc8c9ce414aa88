"""testbed/boot_log.py: rich synthetic UEFI logs; tpm2_eventlog (tpm2-tools) agrees with our parser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from keytrio.protocol import eventlog as el
from keytrio.protocol import eventlog_parse, eventlog_replay
from keytrio.testbed import boot_log

CONFIGS = {"good": boot_log.BootConfig()} | {k: boot_log.BootConfig().tampered(k) for k in boot_log.TAMPER_KNOBS}
BANK_SETS = (("sha256",), ("sha1", "sha256"), ("sha1", "sha256", "sha384", "sha512"))


def _tpm2_eventlog(path: Path) -> list[dict]:
    """tpm2_eventlog's YAML, read line by line (the fields we compare)."""
    out = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True, timeout=30).stdout
    events: list[dict] = []
    alg = None
    for line in out.splitlines():
        if m := re.match(r"- EventNum: (\d+)", line):
            events.append({"num": int(m[1]), "digests": {}})
        elif m := re.match(r"  PCRIndex: (\d+)", line):
            events[-1]["pcr"] = int(m[1])
        elif m := re.match(r"  EventType: (\S+)", line):
            events[-1]["type"] = m[1]
        elif m := re.match(r"  - AlgorithmId: (\S+)", line):
            alg = m[1]
        elif (m := re.match(r'    Digest: "([0-9a-f]+)"', line)) and alg:
            events[-1]["digests"][alg] = m[1]
            alg = None
        elif m := re.match(r"  EventSize: (\d+)", line):
            events[-1]["size"] = int(m[1])
    return events


@pytest.mark.parametrize("banks", BANK_SETS, ids="+".join)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tpm2_eventlog_agrees(tmp_path: Path, name: str, banks: tuple[str, ...]) -> None:
    assert shutil.which("tpm2_eventlog"), "tpm2-tools not installed: ./scripts/setup installs it"
    raw = boot_log.build(banks, CONFIGS[name])
    path = tmp_path / "binary_bios_measurements"
    path.write_bytes(raw)
    theirs = _tpm2_eventlog(path)
    ours = eventlog_parse.parse(raw)
    assert len(theirs) == len(ours.events)
    for t, o in zip(theirs, ours.events, strict=True):
        assert t["num"] == o.number
        assert t["pcr"] == o.pcr
        assert t["type"] == o.type_name
        assert t["size"] == len(o.data)
        if o.number:
            assert t["digests"] == {b: d.hex() for b, d in o.digests.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_events_and_log_agree(name: str) -> None:
    cfg = CONFIGS[name]
    log = eventlog_parse.parse(boot_log.build(["sha1", "sha256"], cfg))
    extends = boot_log.events(["sha1", "sha256"], cfg)
    logged = [(e.pcr, e.digests) for e in log.events[1:] if e.event_type != el.EV_NO_ACTION]
    assert logged == extends
    assert eventlog_replay.replay(log, "sha256") == boot_log.expected_pcrs("sha256", cfg)


def test_default_is_good_boot_and_knobs_differ() -> None:
    minimal = eventlog_parse.parse(boot_log.build(["sha256"]))  # what machines boot without a BootConfig
    assert [(e.pcr, e.type_name) for e in minimal.events[1:]] == [(p, "EV_SEPARATOR") for p in range(8)]
    logs = {n: boot_log.build(["sha256"], c) for n, c in CONFIGS.items()}
    assert len(set(logs.values())) == len(logs)
    with pytest.raises(ValueError):
        boot_log.BootConfig().tampered("nope")
    with pytest.raises(ValueError):
        boot_log.build(["md5"])


def test_tamper_knobs_change_the_right_events() -> None:
    def apps(cfg: boot_log.BootConfig) -> list[el.Event]:
        return [e for e in eventlog_parse.parse(boot_log.build(["sha256"], cfg)).events
                if e.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION]
    assert len(apps(CONFIGS["good"])) == 3
    assert len(apps(CONFIGS["extra_application"])) == 4
    assert len(apps(CONFIGS["secure_boot_off"])) == 2  # grub does not ask shim_lock: no kernel event
    assert apps(CONFIGS["unknown_kernel"])[2].digests != apps(CONFIGS["good"])[2].digests
