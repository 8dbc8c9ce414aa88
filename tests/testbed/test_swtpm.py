"""testbed.swtpm, swtpm_state and swtpm_detached against the real swtpm binaries: provisioning, EK cert chain, lifecycle, detach."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keytrio.actors.agent.tpm import Tpm
from keytrio.testbed import swtpm as S
from keytrio.testbed import swtpm_detached, swtpm_state

pytestmark = pytest.mark.swtpm


def _alive(pid: int) -> bool:
    return swtpm_detached._pid_alive(pid)  # exited processes that PID 1 has not reaped yet count as dead


def test_provision_private_ca_and_both_ek_certs(tmp_path: Path) -> None:
    assert shutil.which("swtpm_setup"), "swtpm_setup not installed: ./scripts/setup installs it"
    d = tmp_path / "tpm"
    swtpm_state.provision(d, banks=("sha256", "sha384"))
    assert swtpm_state.is_provisioned(d)
    assert swtpm_state.state_banks(d) == ("sha256", "sha384")
    # the CA is private to the state dir
    assert swtpm_state.ca_dir_of(d) == (d / "localca").resolve()
    issuer_pem, root_pem = swtpm_state.ek_ca_certs(d)
    issuer = x509.load_pem_x509_certificate(issuer_pem.read_bytes())
    root = x509.load_pem_x509_certificate(root_pem.read_bytes())
    issuer.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)

    files = swtpm_state.ek_cert_files(d)
    assert set(files) == {"rsa2048", "ecc384"}
    rsa_cert = x509.load_der_x509_certificate(files["rsa2048"].read_bytes())
    ecc_cert = x509.load_der_x509_certificate(files["ecc384"].read_bytes())
    for cert in (rsa_cert, ecc_cert):
        cert.verify_directly_issued_by(issuer)
        with pytest.raises(ValueError):  # a sanity check that the verification can fail
            cert.verify_directly_issued_by(root)
    rsa_key = rsa_cert.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size == 2048
    ecc_key = ecc_cert.public_key()
    assert isinstance(ecc_key, ec.EllipticCurvePublicKey) and ecc_key.curve.name == "secp384r1"

    # idempotent: a second call leaves the manufactured state alone
    before = (d / "tpm" / "tpm2-00.permall").read_bytes()
    swtpm_state.provision(d)
    assert (d / "tpm" / "tpm2-00.permall").read_bytes() == before


def test_bad_banks_rejected(tmp_path: Path) -> None:
    with pytest.raises(swtpm_state.SwtpmError):
        swtpm_state.provision(tmp_path / "x", banks=("md5",))


def test_shared_ca_distinct_eks(swtpm_template: Path, swtpm_ca_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "other"
    swtpm_state.provision(d, ca_dir=swtpm_ca_dir)
    assert swtpm_state.ek_ca_certs(d) == swtpm_state.ek_ca_certs(swtpm_template)
    a = swtpm_state.ek_cert_files(d)["rsa2048"].read_bytes()
    b = swtpm_state.ek_cert_files(swtpm_template)["rsa2048"].read_bytes()
    assert x509.load_der_x509_certificate(a).public_key() != x509.load_der_x509_certificate(b).public_key()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_start_stop(swtpm_template: Path, tmp_path: Path, transport: str) -> None:
    d = tmp_path / "s"
    swtpm_state.copy_state(swtpm_template, d)
    async with S.swtpm_running(d, transport=transport) as sw:
        pid = sw.pid
        assert pid is not None and _alive(pid)
        if transport == "unix":
            assert sw.tcti == f"swtpm:path={d / 'swtpm.sock'}"
        else:
            assert sw.tcti.startswith("swtpm:host=127.0.0.1,port=")
        assert sw.banks == swtpm_state.DEFAULT_BANKS
        assert sw.log_path == d / "swtpm.log"
        async with await Tpm.open(sw.tcti) as tpm:
            assert len(await tpm.get_random(40)) == 40
            assert await tpm.active_banks() == ["sha1", "sha256", "sha384"]
    assert not _alive(pid)
    assert sw.log_path.exists()


async def test_restart_is_a_clean_reboot(swtpm) -> None:
    async with await Tpm.open(swtpm.tcti) as tpm:
        count = await tpm.reset_count()
        await tpm.extend(16, {"sha256": b"\x01" * 32})
        assert (await tpm.read_pcrs("sha256", [16]))[16] != bytes(32)
    tcti = swtpm.tcti
    await swtpm.restart()
    assert swtpm.tcti == tcti
    async with await Tpm.open(swtpm.tcti) as tpm:
        assert await tpm.reset_count() == count + 1
        assert (await tpm.read_pcrs("sha256", [16]))[16] == bytes(32)
        # Shutdown(CLEAR) was sent before stopping: the clock is still "safe"
        assert await tpm._run(lambda e: int(e.read_clock().clockInfo.safe)) == 1


async def test_tcp_restart_keeps_ports(swtpm_factory) -> None:
    sw = await swtpm_factory(transport="tcp", fresh=False)
    tcti = sw.tcti
    await sw.restart()
    assert sw.tcti == tcti
    async with await Tpm.open(sw.tcti) as tpm:
        assert len(await tpm.get_random(8)) == 8


async def test_long_state_path_uses_short_socket(swtpm_template: Path, tmp_path: Path) -> None:
    d = tmp_path / ("x" * 60) / ("y" * 60)
    swtpm_state.copy_state(swtpm_template, d)
    async with S.swtpm_running(d) as sw:
        assert "swtpm:path=/tmp/swtpm-" in sw.tcti
        short = Path(sw.tcti.removeprefix("swtpm:path=")).parent
        tcti = sw.tcti
        await sw.restart()
        assert sw.tcti == tcti
        async with await Tpm.open(sw.tcti) as tpm:
            assert len(await tpm.get_random(8)) == 8
    assert not short.exists()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_detached(swtpm_template: Path, tmp_path: Path, transport: str) -> None:
    d = tmp_path / "det"
    swtpm_state.copy_state(swtpm_template, d)
    tcti = await swtpm_detached.start_detached(d, transport=transport)
    try:
        assert swtpm_detached.detached_tcti(d) == tcti
        # starting again while it runs returns the same instance
        assert await swtpm_detached.start_detached(d, transport=transport) == tcti
        pid = int((d / "swtpm.pid").read_text())
        assert _alive(pid)
        async with await Tpm.open(tcti) as tpm:
            count = await tpm.reset_count()
    finally:
        assert await swtpm_detached.stop_detached(d)
    with trio.fail_after(5):
        while _alive(pid):
            await trio.sleep(0.02)
    assert not await swtpm_detached.stop_detached(d)
    assert swtpm_detached.detached_tcti(d) is None
    # it stopped with Shutdown(CLEAR): the next start is an orderly reset
    tcti = await swtpm_detached.start_detached(d, transport=transport)
    try:
        async with await Tpm.open(tcti) as tpm:
            assert await tpm.reset_count() == count + 1
            assert await tpm._run(lambda e: int(e.read_clock().clockInfo.safe)) == 1
    finally:
        assert await swtpm_detached.stop_detached(d)


async def test_factory_makes_independent_tpms(swtpm_factory) -> None:
    a = await swtpm_factory(banks=("sha256",))
    b = await swtpm_factory()
    assert a.tcti != b.tcti
    async with await Tpm.open(a.tcti) as ta, await Tpm.open(b.tcti) as tb:
        assert await ta.active_banks() == ["sha256"]
        assert await tb.active_banks() == ["sha1", "sha256", "sha384"]
        eka = await ta.endorsement_key()
        ekb = await tb.endorsement_key()
        assert eka.public != ekb.public
