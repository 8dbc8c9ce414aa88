"""From testbed to tenant in one step: the Testbed writes ``tenant.toml`` and ``ek-trust-store/``,
and exactly the tenant commands it prints enrol and show its agents, EK check on (the swtpm EK cert
chains through the swtpm-localca intermediate to its root). Agents whose ids are not UUIDs
(upstream's ``[\\w.-]+``) go through registrar, verifier, agent and tenant."""

from __future__ import annotations

import io
import json
import shlex
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from keytrio.actors.cli import build_parser
from keytrio.actors.tenant import cli as tenant_cli
from keytrio.actors.tenant.ekcheck import check_ek, load_trust_store
from keytrio.testbed.world import Testbed

pytestmark = pytest.mark.swtpm


async def tenant(*argv: str) -> tuple[int, str, str]:
    """``keytrio tenant ARGV`` in-process, through the real ``keytrio`` parser."""
    args = build_parser(plugins=False).parse_args(["tenant", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await tenant_cli.run(args, out=out, err=err, env={})
    return code, out.getvalue(), err.getvalue()


async def test_testbed_up_gives_a_ready_tenant(tmp_path: Path) -> None:
    async with Testbed(tmp_path / "tb", machines=1, machine_options={"uuid": "a.b-c_1"}) as tb:
        await tb.add_machines(1, uuid="wörk-1")
        m0, m1 = tb.machines
        assert (m0.agent_id, m1.agent_id) == ("a.b-c_1", "wörk-1")

        conf = tomllib.loads(tb.tenant_config.read_text())["tenant"]
        assert conf["registrar_tls_port"] == tb.registrar_addresses.https[1]
        assert conf["verifier_port"] == tb.verifier_address[1] and conf["require_ek_cert"] is True
        store = Path(conf["tpm_cert_store"])
        assert sorted(p.name for p in store.iterdir()) == ["issuercert.pem", "swtpm-localca-rootca-cert.pem"]

        commands = [shlex.split(c) for c in tb.tenant_commands()]
        assert commands[0] == ["keytrio", "tenant", "add", "-c", str(tb.tenant_config), "a.b-c_1"]
        assert commands[1] == ["keytrio", "tenant", "status", "-c", str(tb.tenant_config), "a.b-c_1"]
        assert tb.describe()["tenant_config"] == str(tb.tenant_config)
        for argv in commands:
            if argv[2] == "add":
                code, out, err = await tenant(*argv[2:])
                assert code == 0, err
                assert err == ""  # no warning: the trust store holds certificates only
                assert f"agent {argv[-1]} enrolled" in out
        code, out, err = await tenant(*commands[1][2:])
        assert code == 0, err
        assert "state        Get Quote (3)" in out and "last event   none" in out
        assert "algorithms   hash sha256, encryption rsa, signing rsassa" in out, out  # as the agent reports them
        code, out, _ = await tenant("list", "-c", str(tb.tenant_config), "--json")
        assert sorted(json.loads(out)["verifier"]) == ["a.b-c_1", "wörk-1"]

        # the EK cert chains through the intermediate to the root, both checked
        reg = await tb.tenant.ready(tb.tenant.registrar)
        rec = (await reg.call("GET", f"/agents/{m1.agent_id}")).results
        path = check_ek(rec["ekcert"], rec["ek_tpm"], load_trust_store([store]))
        assert [c.subject.rfc4514_string() for c in path[1:]] == ["CN=swtpm-localca", "CN=swtpm-localca-rootca"]
        # the root alone is not enough: the EK's issuer is unknown to it, and nothing is enrolled
        root = x509.load_pem_x509_certificate((store / "swtpm-localca-rootca-cert.pem").read_bytes())
        assert root.subject == root.issuer
        code, out, _ = await tenant("delete", "-c", str(tb.tenant_config), "wörk-1")
        assert code == 0, out
        code, _, err = await tenant("add", "-c", str(tb.tenant_config), "--ek-trust-store",
                                    str(store / "swtpm-localca-rootca-cert.pem"), "wörk-1")
        assert code == 4 and "not issued by a CA of the EK trust store (issuer CN=swtpm-localca)" in err
        code, out, _ = await tenant("list", "-c", str(tb.tenant_config), "--json")
        assert json.loads(out)["verifier"] == ["a.b-c_1"]
        # the swtpm-localca directory itself (keys, serial, configuration beside the certificates)
        # works, its other files named once in a warning
        code, out, err = await tenant("add", "-c", str(tb.tenant_config), "--ek-trust-store",
                                      str(tb.dir / "swtpm-localca"), "wörk-1")
        assert code == 0, err
        assert err.count("\n") == 1 and "warning: EK trust store" in err and "signkey.pem" in err

        # ids outside upstream's rule are refused before any request; unknown ones are a 404
        code, _, err = await tenant("status", "-c", str(tb.tenant_config), "a/b")
        assert code == 2 and "agent id 'a/b'" in err
        code, _, err = await tenant("status", "-c", str(tb.tenant_config), "foo")
        assert code == 5 and "not a valid" not in err


async def test_testbed_up_command_prints_working_tenant_commands(tmp_path: Path) -> None:
    """The real commands, as processes: ``keytrio testbed up``, then what it printed."""
    import signal
    import subprocess
    import sys

    import trio

    keytrio = str(Path(sys.executable).with_name("keytrio"))
    tb_dir = tmp_path / "tb"
    proc = await trio.lowlevel.open_process([keytrio, "testbed", "up", "--dir", str(tb_dir), "--seed", "3"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        err = b""
        with trio.fail_after(120):
            while b"Ctrl-C" not in err:
                assert proc.stderr is not None
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, err.decode()
                err += chunk
        lines = [ln.strip() for ln in err.decode().splitlines()]
        assert lines[0] == f"tenant configuration: {tb_dir / 'tenant.toml'}; for example:"
        commands = [shlex.split(ln) for ln in lines if ln.startswith("keytrio tenant ")]
        add, status = commands[0], commands[1]
        assert add[:3] == ["keytrio", "tenant", "add"] and status[:3] == ["keytrio", "tenant", "status"]
        for argv in (add, status):
            done = await trio.run_process([keytrio, *argv[1:]], capture_stdout=True, capture_stderr=True,
                                          check=False, cwd=tmp_path)
            assert done.returncode == 0, done.stderr.decode()
        assert "state        Get Quote" in done.stdout.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            await proc.wait()
    assert proc.returncode == 0


async def test_testbed_up_with_push_agents_prints_working_push_commands(tmp_path: Path) -> None:
    """``keytrio testbed up --agents 0 --push-agents 1`` as a process: its JSON names the machine a
    push agent behind a NAT gateway, and the commands it prints for it work as printed: ``tenant
    add --push`` enrols it, it attests by itself (a passed attestation in ``tenant attestations``),
    ``tenant status`` shows it in Get Quote."""
    import json
    import signal
    import subprocess
    import sys

    import trio

    keytrio = str(Path(sys.executable).with_name("keytrio"))
    tb_dir = tmp_path / "tb"
    proc = await trio.lowlevel.open_process(
        [keytrio, "testbed", "up", "--dir", str(tb_dir), "--agents", "0", "--push-agents", "1", "--seed", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        err = out = b""
        with trio.fail_after(120):  # a hang guard
            while b"Ctrl-C" not in err:
                assert proc.stderr is not None
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, err.decode()
                err += chunk
            assert proc.stdout is not None
            while not out.rstrip().endswith(b"}"):
                out += await proc.stdout.receive_some(65536)
        (machine,) = json.loads(out)["agents"]
        assert machine["mode"] == "push" and machine["behind_nat"] and "address" not in machine, machine
        commands = [shlex.split(ln.strip()) for ln in err.decode().splitlines()
                    if ln.strip().startswith("keytrio tenant ")]
        aid = machine["agent_id"]
        assert [c[2:4] for c in commands] == [["add", "--push"], ["attestations", "-c"], ["status", "-c"],
                                              ["list", "-c"]], commands
        assert all(c[-1] == aid for c in commands[:3]), commands

        async def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
            return await trio.run_process([keytrio, *argv[1:]], capture_stdout=True, capture_stderr=True,
                                          check=False, cwd=tmp_path)

        done = await run(commands[0])
        assert done.returncode == 0, done.stderr.decode()
        with trio.fail_after(60):  # a hang guard: the agent retries at most every 5 s until enrolled
            while True:
                done = await run(commands[1])
                assert done.returncode == 0, done.stderr.decode()
                if " verification_complete pass " in done.stdout.decode():  # "#<i> <stage> <evaluation> <when>"
                    break
                await trio.sleep(0.5)
        done = await run(commands[2])
        assert done.returncode == 0 and "state        Get Quote" in done.stdout.decode(), done.stdout.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            await proc.wait()
    assert proc.returncode == 0
