"""``keytrio eventlog FILE [--json] [--replay] [--pcrs] [--bank]`` on the public real logs
(tests/protocol/data/eventlogs): what it prints, its exit codes, and no crash on damaged logs."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.actors import cli as keytrio_cli
from keytrio.actors.eventlog import cli

DATA = Path(__file__).resolve().parents[2] / "protocol" / "data" / "eventlogs"
LOGS = sorted(DATA.glob("*.bin"))
REAL_PCRS = json.loads((DATA / "real_tpm_pcrs.json").read_text())


def run(*argv: str | Path) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    out, err = io.StringIO(), io.StringIO()
    return args.func(args, out, err), out.getvalue(), err.getvalue()


def test_registered_as_a_keytrio_verb() -> None:
    args = keytrio_cli.build_parser(plugins=False).parse_args(["eventlog", str(LOGS[0]), "--json", "--pcrs", "0,7"])
    assert args.func is cli.main and args.json and args.pcrs == "0,7"


def test_text_dump_of_a_sha1_format_windows_log() -> None:
    code, out, err = run(DATA / "goatt_windows_gcp.bin", "--replay")
    assert (code, err) == (0, "")
    assert out.startswith("format: sha1  banks: sha1 (20 bytes)  events: 21\n")
    assert out.count("\n#") == 21
    assert "#0 PCR 0 EV_S_CRTM_VERSION at byte 0, 2 bytes of data, data: bound" in out
    assert "EV_EFI_BOOT_SERVICES_APPLICATION at byte" in out and "data: digest-only" in out
    for pcr, value in REAL_PCRS["goatt_windows_gcp.bin"]["sha1"].items():
        if f"\n  {int(pcr):>2}: " in out:
            assert f"\n  {int(pcr):>2}: {value}\n" in out


def test_json_replay_equals_the_real_tpm() -> None:
    name = "goatt_ubuntu_2104_shielded_vm_no_secure_boot_eventlog.bin"
    code, out, _ = run(DATA / name, "--json", "--replay", "--pcrs", "0,4,7", "--bank", "sha256")
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "crypto-agile" and set(doc["banks"]) == {"sha1", "sha256", "sha384"}
    assert {e["PCRIndex"] for e in doc["events"]} == {0, 4, 7}
    assert {e["DataDigest"] for e in doc["events"]} == {"bound", "digest-only"}
    assert list(doc["pcrs"]) == ["sha256"]
    assert doc["pcrs"]["sha256"] == {p: REAL_PCRS[name]["sha256"][p] for p in ("0", "4", "7")}


def test_unknown_pcr_values_are_said_not_invented() -> None:
    code, out, _ = run(DATA / "t2t_event-uefivar.bin", "--replay")
    assert code == 0
    assert "PCRs (sha384):\n   7: unknown: event 1 (PCR 7, EV_EFI_VARIABLE_DRIVER_CONFIG, byte 77) has no sha384 digest" in out


def test_exit_codes(tmp_path: Path) -> None:
    code, out, err = run(DATA / "t2t_specid-vendordata.bin")
    assert (code, out) == (1, "") and "not an event log: Spec ID event: vendorInfoSize 4" in err and "(at byte 68)" in err
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert run(empty)[0] == 1
    assert run(tmp_path / "missing.bin")[0] == 2
    code, _, err = run(LOGS[0], "--pcrs", "0,x")
    assert code == 2 and "--pcrs" in err
    code, _, err = run(DATA / "goatt_windows_gcp.bin", "--bank", "sha256")
    assert code == 2 and "the log's banks are sha1" in err


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_logs_never_crash(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    src = data.draw(st.sampled_from(LOGS))
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("fuzz") / "log.bin"
    path.write_bytes(bytes(raw))
    for extra in ((), ("--json", "--replay")):
        code, out, err = run(path, *extra)
        assert code in (0, 1)
        assert (code == 0) == (err == "")
        if code == 0 and extra:
            json.loads(out)


def test_as_a_process_truncated_log_exits_1(tmp_path: Path) -> None:
    raw = (DATA / "goatt_option_rom_eventlog.bin").read_bytes()  # tpm2_eventlog 5.4 segfaults on the whole log
    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw[:1000])
    whole = subprocess.run([sys.executable, "-m", "keytrio.actors.eventlog", str(DATA / "goatt_option_rom_eventlog.bin"),
                            "--replay"], capture_output=True, text=True, timeout=60)
    assert whole.returncode == 0 and "events: 61" in whole.stdout
    proc = subprocess.run([sys.executable, "-m", "keytrio.actors.eventlog", str(cut)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"keytrio eventlog: {cut}: not an event log: ") and "(at byte " in proc.stderr
