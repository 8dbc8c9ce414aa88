"""Simulated machines: boot extends PCRs 0-7 and starts IMA, the agent registers, reboots re-bind."""

from pathlib import Path

import pytest
import trio

from keytrio.actors.registrar.actor import Registrar
from keytrio.actors.registrar.config import load_config
from keytrio.protocol import ima, tpm2
from keytrio.testbed import boot_log
from keytrio.testbed.machine import Machine
from keytrio.testbed.pki import make_cv_ca

pytestmark = pytest.mark.swtpm


def _registrar(tmp: Path, ca) -> Registrar:
    return Registrar(load_config(None, env={}, overrides={
        "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(tmp / "registrar"),
        "server_cert": str(ca.server_cert), "server_key": str(ca.server_key),
        "trusted_client_ca": [str(ca.ca)], "graceful_timeout": 0.5,
    }))


async def test_machine_boot_register_measure_reboot(tmp_path: Path, swtpm_ca_dir: Path):
    ca = make_cv_ca(tmp_path / "cv_ca")
    registrar = _registrar(tmp_path, ca)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(registrar.run)
        m = Machine("m1", tmp_path, ca, registrar=addrs.http, seed=7, swtpm_ca_dir=swtpm_ca_dir)
        await nursery.start(m.run)
        first_id, first_port, first_boot = m.agent_id, m.address[1], m.boottime_path.read_text()

        # boot: separators in PCRs 0-7, boot_aggregate first in the IMA log, PCR 16 binds the NK
        pcrs = await m.read_pcrs("sha256", [0, 7, 10, 16])
        sep = dict(boot_log.events(["sha256"]))[0]["sha256"]
        assert pcrs[0] == pcrs[7] == tpm2.extend_value("sha256", bytes(32), sep)
        entries = ima.parse_list(m.ima_path.read_text())
        assert entries[0].path == "boot_aggregate"
        assert ima.replay(entries, "sha256") == pcrs[10]
        assert pcrs[16] == tpm2.pcr16_binding_value("sha256", m.info.nk_pem)
        assert m.boot_log_path.read_bytes() == boot_log.build(m.banks)

        # measurements go through the running agent's TPM handle
        for i in range(5):
            await m.measure(f"/usr/bin/t{i}")
        entries = ima.parse_list(m.ima_path.read_text())
        assert len(entries) == 6
        assert ima.replay(entries, "sha1") == (await m.read_pcrs("sha1", [10]))[10]

        # reboot: fresh IMA log, new boot time, same identity and port, PCR 16 bound again
        await m.reboot()
        assert m.agent_id == first_id and m.address[1] == first_port
        assert m.boottime_path.read_text() != first_boot
        entries = ima.parse_list(m.ima_path.read_text())
        assert len(entries) == 1 and entries[0].path == "boot_aggregate"
        pcrs = await m.read_pcrs("sha256", [10, 16])
        assert ima.replay(entries, "sha256") == pcrs[10]
        assert pcrs[16] == tpm2.pcr16_binding_value("sha256", m.info.nk_pem)

        # the registrar saw both registrations of the same identity
        rec = await registrar.service.get(first_id)
        assert rec is not None and rec["regcount"] == 2

        # agent stopped: the machine still measures through its own TPM connection
        await m.stop_agent()
        await m.measure("/usr/bin/offline")
        await m.start_agent()
        entries = ima.parse_list(m.ima_path.read_text())
        assert ima.replay(entries, "sha256") == (await m.read_pcrs("sha256", [10]))[10]
        nursery.cancel_scope.cancel()


async def test_machine_behind_proxy_registers_proxy_port(tmp_path: Path, swtpm_ca_dir: Path):
    import httpx

    from keytrio.actors.common import tls

    ca = make_cv_ca(tmp_path / "cv_ca")
    registrar = _registrar(tmp_path, ca)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(registrar.run)
        m = Machine("m2", tmp_path, ca, registrar=addrs.http, swtpm_ca_dir=swtpm_ca_dir, proxy=True)
        await nursery.start(m.run)
        rec = await registrar.service.get(m.agent_id)
        assert rec["port"] == m.contact[1] != m.address[1]
        ctx = tls.client_context([ca.ca], ca.client_cert, ca.client_key, pinned_server_cert_pem=m.info.mtls_cert)
        url = "https://{}:{}/version".format(*m.contact)
        async with httpx.AsyncClient(verify=ctx, timeout=2) as client:
            assert (await client.get(url)).status_code == 200
            m.cut_network("refuse")
            with pytest.raises(httpx.TransportError):
                await client.get(url)
            m.restore_network()
            assert (await client.get(url)).status_code == 200
        nursery.cancel_scope.cancel()


async def test_machine_boots_rich_uefi_log_and_reboots_into_another(tmp_path: Path, swtpm_ca_dir: Path):
    ca = make_cv_ca(tmp_path / "cv_ca")
    registrar = _registrar(tmp_path, ca)
    good = boot_log.BootConfig()
    evil = good.tampered("unknown_kernel")
    touched = sorted(boot_log.expected_pcrs("sha256", good))

    async def check(m: Machine, cfg: boot_log.BootConfig | None) -> None:
        pcrs = await m.read_pcrs("sha256", [*touched, 10])
        want = boot_log.expected_pcrs("sha256", cfg)
        assert {p: pcrs[p] for p in want} == want
        assert m.boot_log_path.read_bytes() == boot_log.build(m.banks, cfg)
        entries = ima.parse_list(m.ima_path.read_text())
        assert [e.path for e in entries] == ["boot_aggregate"] and ima.replay(entries, "sha256") == pcrs[10]

    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(registrar.run)
        m = Machine("m1", tmp_path, ca, registrar=addrs.http, swtpm_ca_dir=swtpm_ca_dir, boot=good)
        await nursery.start(m.run)
        assert set(touched) >= {0, 1, 4, 5, 7, 8, 9, 14}
        await check(m, good)  # the rich log from the first boot on

        await m.reboot(boot=evil)
        await check(m, evil)
        assert (await m.read_pcrs("sha256", [4]))[4] != boot_log.expected_pcrs("sha256", good)[4]
        await m.reboot()  # the same boot again
        assert m.boot == evil
        await check(m, evil)
        await m.reboot(boot=None)  # back to the minimal log
        await check(m, None)
        nursery.cancel_scope.cancel()
