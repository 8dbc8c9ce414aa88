"""The testbed's IMA writer: file contents, write-then-extend order, replay against PCR 10."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from keytrio.protocol import ima, tpm2
from keytrio.testbed.ima_log import FILE_NAME, ImaLog

BANKS = ["sha1", "sha256", "sha384"]


class SoftPcrs:
    """In-memory PCRs extended like a TPM's (the pure tests' extend callback).

    It also records how many lines the log file held at each extend, to check the order.
    """

    def __init__(self, log_path: Path) -> None:
        self.values = {b: {i: bytes(tpm2.DIGEST_SIZES[b]) for i in range(24)} for b in BANKS}
        self.lines_at_extend: list[int] = []
        self.log_path = log_path

    async def extend(self, pcr: int, digests: dict[str, bytes]) -> None:
        self.lines_at_extend.append(self.log_path.read_bytes().count(b"\n"))
        await trio.sleep(0)  # let concurrent writers interleave if they could
        for bank, d in digests.items():
            self.values[bank][pcr] = hashlib.new(bank, self.values[bank][pcr] + d).digest()


async def test_log_written_then_extended(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    pcrs = SoftPcrs(path)
    log = ImaLog(path, pcrs.extend, BANKS)
    pcrs.values["sha256"][0] = b"\x07" * 32
    await log.boot_aggregate({b: {i: pcrs.values[b][i] for i in range(8)} for b in BANKS})
    for i in range(20):
        await log.measure(f"/usr/bin/tool {i}", b"content %d" % i)
    await log.tomtou("/etc/passwd")
    await log.measure("/usr/bin/signed", b"x", template="ima-sig", signature=b"\x03\x02sig")
    await log.measure("/usr/bin/unsigned", b"y", template="ima-sig")
    await log.measure("/old", b"z", template="ima")
    await log.buf("kexec-cmdline", b"root=/dev/sda1 ro")

    # every extend happened after its line was in the file
    assert pcrs.lines_at_extend == list(range(1, len(log) + 1))
    text = path.read_text()
    assert text == log.text()
    entries = ima.parse_list(text)
    assert entries == log.entries
    assert entries[0].path == "boot_aggregate" and entries[0].digest_alg == "sha256"
    assert entries[0].digest == ima.boot_aggregate("sha256", pcrs.values["sha256"])
    assert entries[1].path == "/usr/bin/tool_0"  # the kernel's space -> underscore
    assert entries[1].digest == hashlib.sha256(b"content 0").digest()
    assert entries[21].is_violation
    assert all(ima.check_template_hash(e) for e in entries)
    for bank in BANKS:
        assert ima.replay(entries, bank) == pcrs.values[bank][10]


async def test_concurrent_measures_keep_file_and_pcr_order(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    pcrs = SoftPcrs(path)
    log = ImaLog(path, pcrs.extend, ["sha1", "sha256"])
    await log.boot_aggregate({"sha256": {i: bytes(32) for i in range(8)}})
    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(log.measure, f"/bin/p{i}", b"%d" % i)
    entries = ima.parse_list(path.read_text())
    assert len(entries) == 31
    for bank in ("sha1", "sha256"):
        assert ima.replay(entries, bank) == pcrs.values[bank][10]


async def test_new_boot_starts_new_file(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("stale line from the previous boot\n")
    pcrs = SoftPcrs(path)
    log = ImaLog(path, pcrs.extend, ["sha1"])
    await log.boot_aggregate({"sha1": {i: bytes(20) for i in range(8)}})
    assert ima.parse_list(path.read_text())[0].path == "boot_aggregate"
    with pytest.raises(RuntimeError):
        await log.boot_aggregate({"sha1": {i: bytes(20) for i in range(8)}})


@pytest.mark.swtpm
async def test_replay_matches_swtpm_pcr10(tmp_path: Path, tpm) -> None:
    banks = ["sha1", "sha256", "sha384"]  # the fixture's active banks
    path = tmp_path / FILE_NAME
    # The TPM may be shared with other tests: replay from PCR 10's current value.
    start = {b: (await tpm.read_pcrs(b, [10]))[10] for b in banks}
    boot = {b: await tpm.read_pcrs(b, list(range(8))) for b in banks}
    log = ImaLog(path, tpm.extend, banks)
    await log.boot_aggregate(boot)
    for i in range(100):
        await log.measure(f"/usr/lib/mod{i}.so", b"module %d" % i)
    await log.tomtou("/var/log/tomtou")
    await log.measure("/usr/bin/after", b"after the violation")

    entries = ima.parse_list(path.read_text())
    assert len(entries) == 103
    assert entries[0].digest == ima.boot_aggregate("sha256", boot["sha256"])
    for bank in banks:
        pcr10 = (await tpm.read_pcrs(bank, [10]))[10]
        assert ima.replay(entries, bank, start[bank]) == pcr10
    r = ima.Replayer(banks, start)
    assert r.advance_to(entries, "sha256", (await tpm.read_pcrs("sha256", [10]))[10]) == 103
