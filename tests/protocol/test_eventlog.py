"""protocol/eventlog*.py: parse, decode, replay; hostile bytes give typed errors only."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import eventlog as el
from keytrio.protocol import eventlog_data, eventlog_parse, eventlog_replay
from keytrio.protocol.errors import DecodeError
from keytrio.testbed import boot_log

BANKS = ("sha1", "sha256", "sha384")
GOOD = boot_log.BootConfig()


@pytest.fixture(scope="module")
def good_log() -> el.EventLog:
    return eventlog_parse.parse(boot_log.build(BANKS, GOOD))


def test_spec_id_and_banks(good_log: el.EventLog) -> None:
    assert good_log.banks == list(BANKS)
    assert good_log.spec_id.uintn_size == 2
    assert good_log.events[0].event_type == el.EV_NO_ACTION


def test_every_event_decodes(good_log: el.EventLog) -> None:
    assert [ev.number for ev in good_log.events] == list(range(len(good_log.events)))
    assert not [ev for ev in good_log.events if ev.decode_error]
    for ev in good_log.events[1:]:
        assert set(ev.digests) == set(BANKS)


def test_decoded_variables(good_log: el.EventLog) -> None:
    by_name = {ev.decoded["UnicodeName"]: ev.decoded for ev in good_log.events
               if ev.event_type == el.EV_EFI_VARIABLE_DRIVER_CONFIG}
    assert by_name["SecureBoot"]["VariableName"] == el.EFI_GLOBAL_VARIABLE
    assert by_name["SecureBoot"]["VariableData"] == {"Enabled": "Yes"}
    assert by_name["db"]["VariableName"] == el.EFI_IMAGE_SECURITY_DATABASE
    pk = by_name["PK"]["VariableData"]
    assert pk[0]["SignatureType"] == el.EFI_CERT_X509_GUID
    assert pk[0]["Keys"][0]["SignatureOwner"] == str(boot_log.VENDOR_OWNER)
    assert pk[0]["Keys"][0]["SignatureData"] == boot_log.BootConfig().pk[0].hex()
    dbx = by_name["dbx"]["VariableData"]
    assert len(dbx) == 1 and dbx[0]["SignatureType"] == el.EFI_CERT_SHA256_GUID and len(dbx[0]["Keys"]) == 4


def test_decoded_boot_and_images(good_log: el.EventLog) -> None:
    boot = [ev.decoded for ev in good_log.events if ev.event_type == el.EV_EFI_VARIABLE_BOOT]
    assert boot[0]["VariableData"] == ["Boot0001", "Boot0000"]
    assert boot[1]["VariableData"]["Description"] == "debian"
    assert boot[1]["VariableData"]["DevicePath"].endswith("File(\\EFI\\debian\\shimx64.efi)")
    apps = [ev for ev in good_log.events if ev.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION]
    assert len(apps) == 3
    assert apps[0].decoded["DevicePath"].startswith("PciRoot(0x0)/Pci(0x4,0x1)/HD(1,GPT,")
    assert apps[0].digests["sha256"] == boot_log.authenticode(boot_log.BootConfig().shim, "sha256")
    ipl = [ev.decoded["String"] for ev in good_log.events if ev.event_type == el.EV_IPL and ev.pcr == 8]
    assert ipl[-1].startswith("kernel_cmdline: /boot/vmlinuz-")
    gpt = next(ev for ev in good_log.events if ev.event_type == el.EV_EFI_GPT_EVENT)
    assert gpt.decoded["Partitions"][0]["PartitionName"] == "EFI System Partition"


@pytest.mark.parametrize("bank", BANKS)
def test_replay_matches_extends(good_log: el.EventLog, bank: str) -> None:
    assert eventlog_replay.replay(good_log, bank) == boot_log.expected_pcrs(bank, GOOD)
    assert eventlog_replay.mismatched_pcrs(good_log, bank, boot_log.expected_pcrs(bank, GOOD), range(10)) == []
    wrong = dict(boot_log.expected_pcrs(bank, GOOD))
    wrong[4] = bytes(len(wrong[4]))
    assert eventlog_replay.mismatched_pcrs(good_log, bank, wrong, range(10)) == [4]


def test_replay_unknown_bank(good_log: el.EventLog) -> None:
    with pytest.raises(el.EventLogError):
        eventlog_replay.replay(good_log, "sha512")


def test_startup_locality_sets_pcr0() -> None:
    raw = boot_log.build(["sha256"], GOOD)
    ev = eventlog_parse.parse(raw).events
    loc = b"StartupLocality\x00\x03"
    extra = struct.pack("<III", 0, el.EV_NO_ACTION, 1) + struct.pack("<H", 0x000B) + bytes(32) \
        + struct.pack("<I", len(loc)) + loc
    # insert right after the Spec ID event
    head = 32 + len(ev[0].data)
    log = eventlog_parse.parse(raw[:head] + extra + raw[head:])
    assert eventlog_replay.startup_locality(log) == 3
    pcr0 = bytes(31) + b"\x03"
    for e in log.events[1:]:
        if e.pcr == 0 and e.event_type != el.EV_NO_ACTION:
            pcr0 = hashlib.sha256(pcr0 + e.digests["sha256"]).digest()
    assert eventlog_replay.replay(log, "sha256")[0] == pcr0


@pytest.mark.parametrize("raw", [b"", b"\x00" * 10, b"\x00" * 32, boot_log.build(["sha256"], GOOD)[:-3]])
def test_broken_logs(raw: bytes) -> None:
    with pytest.raises(el.EventLogError):
        eventlog_parse.parse(raw)


def test_other_spec_id_means_the_sha1_layout() -> None:
    # only "Spec ID Event03" switches to TCG_PCR_EVENT2 records (as in go-attestation and tpm2-tools);
    # read in the SHA-1 layout, the crypto-agile records after it are not events
    raw = bytearray(boot_log.build(["sha256"], GOOD))
    raw[32:48] = b"Spec ID Event02\x00"
    with pytest.raises(el.EventLogError, match="event 1") as exc:
        eventlog_parse.parse(bytes(raw))
    assert exc.value.offset > 32


def test_bad_variable_data_kept_raw() -> None:
    raw = boot_log.build(["sha256"], GOOD)
    log = eventlog_parse.parse(raw)
    sb = next(e for e in log.events if e.event_type == el.EV_EFI_VARIABLE_DRIVER_CONFIG)
    # find and corrupt the UnicodeNameLength of the SecureBoot variable
    start = raw.index(sb.data)
    bad = raw[:start + 16] + struct.pack("<Q", 2**40) + raw[start + 24:]
    ev = next(e for e in eventlog_parse.parse(bad).events if e.event_type == el.EV_EFI_VARIABLE_DRIVER_CONFIG)
    assert ev.decoded is None and ev.decode_error


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hostile_bytes_give_typed_errors(data: st.DataObject) -> None:
    raw = bytearray(boot_log.build(["sha1", "sha256"], GOOD))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        log = eventlog_parse.parse(bytes(raw[:cut]))
    except DecodeError:
        return
    for bank in log.banks:
        eventlog_replay.replay(log, bank)
    for ev in log.events:
        ev.to_json()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes(raw: bytes) -> None:
    try:
        eventlog_parse.parse(raw)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_event_data_decoders(raw: bytes) -> None:
    for etype in (el.EV_EFI_VARIABLE_DRIVER_CONFIG, el.EV_EFI_VARIABLE_BOOT, el.EV_EFI_BOOT_SERVICES_APPLICATION,
                  el.EV_EFI_GPT_EVENT, el.EV_EFI_HANDOFF_TABLES2, el.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
                  el.EV_EFI_VARIABLE_AUTHORITY, el.EV_S_CRTM_VERSION):
        ev = el.Event(1, 0, etype, {}, raw)
        eventlog_data.decode_into(ev)
        assert ev.decoded is not None or ev.decode_error is not None
