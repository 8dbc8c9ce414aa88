"""deploy/: the three-machines guide runs as written, the sample configs load, the units verify.

The guide's ```` ```sh machine=NAME ```` blocks are run in order, each by bash in its machine's
directory (``$ETC`` and ``$VAR`` inside it, every address 127.0.0.1, every port moved to a free one
by ``KEYTRIO_*`` environment overrides, the agent's TPM an swtpm from ``keytrio testbed tpm start``).
The ``machine=all`` block (settings) is prepended to every block; ``service=ACTOR`` blocks run in
the background until their start line is logged; ``copy=FILE:MACHINE`` blocks are not run, their
file is copied to that machine's directory instead (they are ``scp`` commands).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from keytrio.actors.agent import config as agent_config
from keytrio.actors.registrar import config as registrar_config
from keytrio.actors.tenant import config as tenant_config
from keytrio.actors.verifier import config as verifier_config
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GUIDE = DEPLOY / "three-machines.md"
BIN = Path(sys.executable).parent
KEYTRIO = BIN / "keytrio"
STARTED = {"registrar": "event=registrar.started", "verifier": "event=verifier.started", "agent": "event=serving"}
STOPPED = {"registrar": "event=registrar.stopped", "verifier": "event=verifier.stopped", "agent": "event=shutdown"}
BLOCK = re.compile(r"^```sh machine=(\S+)((?: \w+=\S+)*)\n(.*?)^```$", re.M | re.S)


@dataclass
class Block:
    machine: str
    attrs: dict[str, str]
    text: str


def guide_blocks() -> list[Block]:
    out = []
    for m in BLOCK.finditer(GUIDE.read_text()):
        attrs = dict(a.split("=", 1) for a in m.group(2).split())
        out.append(Block(m.group(1), attrs, m.group(3)))
    return out



def test_guide_blocks_parse() -> None:
    blocks = guide_blocks()
    assert [b.machine for b in blocks if b.machine == "all"] == ["all"]
    assert {b.attrs.get("service") for b in blocks} >= {"registrar", "verifier", "agent"}
    assert all(b.machine in ("all", "verifier", "registrar", "agent") for b in blocks)


@pytest.mark.parametrize("actor,loader", [
    ("registrar", registrar_config.load_config), ("verifier", verifier_config.load_config),
    ("agent", agent_config.load), ("tenant", tenant_config.load),
])
def test_sample_configs_load_and_cover_every_option(actor: str, loader: object) -> None:
    path = DEPLOY / f"{actor}.toml"
    cfg = loader(path, env={})  # type: ignore[operator]
    assert cfg is not None
    keys = set(tomllib.loads(path.read_text())[actor])
    options = {o.name for o in {"registrar": registrar_config.OPTIONS, "verifier": verifier_config.OPTIONS,
                                "agent": agent_config.OPTIONS, "tenant": tenant_config.OPTIONS}[actor]}
    text = path.read_text()
    # every option appears, set or as a commented default (regenerate the sample after adding one)
    missing = [o for o in options if o not in keys and f"# {o} = " not in text]
    assert not missing, f"deploy/{actor}.toml lacks {missing}: run `python deploy/make_samples.py`"


def test_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed: ./scripts/setup installs it (apt package systemd)"
    units = sorted(DEPLOY.glob("keytrio-*.service"))
    assert [u.name for u in units] == ["keytrio-agent.service", "keytrio-registrar.service",
                                       "keytrio-verifier.service"]
    for unit in units:
        text = unit.read_text()
        actor = unit.stem.removeprefix("keytrio-")
        assert f"ExecStart=/usr/local/bin/keytrio {actor} --config /etc/keytrio/{actor}.toml" in text
        assert "Restart=on-failure" in text
        # verify checks that ExecStart exists: point it at this checkout's keytrio
        (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/keytrio", str(KEYTRIO)))
    agent = (DEPLOY / "keytrio-agent.service").read_text()
    assert "PrivateDevices=yes" not in agent and "DeviceAllow=/dev/tpmrm0 rw" in agent
    r = subprocess.run([analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "Failed to" in r.stderr and "bus" in r.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run in this container: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.services: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
        self.env["PATH"] = f"{BIN}:{self.env.get('PATH', '')}"
        ports = {name: free_port() for name in ("reg", "reg_tls", "reg_m", "ver", "ver_m", "agent", "agent_m")}
        self.env.update({
            "VERIFIER_IP": "127.0.0.1", "REGISTRAR_IP": "127.0.0.1", "AGENT_IP": "127.0.0.1", "SRC": str(REPO),
            "KEYTRIO_REGISTRAR_PORT": str(ports["reg"]), "KEYTRIO_REGISTRAR_TLS_PORT": str(ports["reg_tls"]),
            "KEYTRIO_REGISTRAR_METRICS_PORT": str(ports["reg_m"]),
            "KEYTRIO_VERIFIER_PORT": str(ports["ver"]), "KEYTRIO_VERIFIER_METRICS_PORT": str(ports["ver_m"]),
            "KEYTRIO_VERIFIER_QUOTE_INTERVAL": "0.5",
            "KEYTRIO_AGENT_PORT": str(ports["agent"]), "KEYTRIO_AGENT_REGISTRAR_PORT": str(ports["reg"]),
            "KEYTRIO_AGENT_METRICS_PORT": str(ports["agent_m"]),
            # a container cannot be trusted to mount a tmpfs; no IMA/UEFI logs of the host
            "KEYTRIO_AGENT_SECURE_MOUNT": "never",
            "KEYTRIO_AGENT_IMA_ML_PATH": str(root / "agent" / "no-ima"),
            "KEYTRIO_AGENT_MEASUREDBOOT_ML_PATH": str(root / "agent" / "no-uefi"),
            "KEYTRIO_TENANT_VERIFIER_PORT": str(ports["ver"]),
            "KEYTRIO_TENANT_REGISTRAR_TLS_PORT": str(ports["reg_tls"]),
            "KEYTRIO_TENANT_WAIT_TIMEOUT": "30", "KEYTRIO_TENANT_REQUEST_TIMEOUT": "10",
        })
        self.verifier_metrics = ports["ver_m"]

    def machine(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def env_for(self, machine: str) -> dict[str, str]:
        d = self.machine(machine)
        return {**self.env, "ETC": str(d / "etc" / "keytrio"), "VAR": str(d / "var" / "lib" / "keytrio")}

    def run(self, block: Block, settings: str) -> str:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", settings + "\n" + block.text],
                           cwd=self.machine(block.machine), env=self.env_for(block.machine),
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, f"{block.machine}: {block.text}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        return r.stdout

    def start(self, block: Block, settings: str) -> None:
        actor = block.attrs["service"]
        log = self.machine(block.machine) / f"{actor}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", settings + "\nexec " + block.text.strip()],
                                    cwd=self.machine(block.machine), env=self.env_for(block.machine),
                                    stdout=out, stderr=subprocess.STDOUT)
        self.services[actor] = (proc, log)
        deadline = time.monotonic() + 45
        while STARTED[actor] not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"{actor} exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{actor} did not start:\n{log.read_text()}"
            time.sleep(0.1)

    def stop_all(self) -> dict[str, tuple[int | None, str]]:
        out = {}
        for actor, (proc, log) in reversed(list(self.services.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out[actor] = (proc.returncode, log.read_text(errors="replace"))
        self.services.clear()
        return out


@pytest.mark.swtpm
def test_three_machines_guide_runs(tmp_path: Path) -> None:
    assert shutil.which("swtpm"), "swtpm is not installed: ./scripts/setup installs it"
    blocks = guide_blocks()
    settings = next(b.text for b in blocks if b.machine == "all")
    w = World(tmp_path)
    tpm_dir = w.machine("agent") / "swtpm"
    tcti = subprocess.run([str(KEYTRIO), "testbed", "tpm", "start", "--dir", str(tpm_dir)], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    w.env["KEYTRIO_AGENT_TCTI"] = tcti
    from keytrio.testbed import swtpm_state

    vendor = w.machine("verifier") / "tpm-vendor-ca"
    vendor.mkdir()
    for i, pem in enumerate(swtpm_state.ek_ca_certs(tpm_dir)):
        shutil.copy(pem, vendor / f"swtpm-{i}.pem")
    w.env["TPM_VENDOR_CA"] = str(vendor)
    outputs: list[str] = []
    stopped: dict[str, tuple[int | None, str]] = {}
    try:
        for b in blocks:
            if b.machine == "all":
                continue
            if "copy" in b.attrs:
                name, to = b.attrs["copy"].split(":")
                shutil.copy(w.machine(b.machine) / name, w.machine(to) / name)
            elif "service" in b.attrs:
                w.start(b, settings)
            else:
                outputs.append(w.run(b, settings))
        text = "\n".join(outputs)
        # tenant status (step 6) and /metrics (step 7), as the guide prints them
        assert re.search(r"^state\s+Get Quote \(3\)", text, re.M), text
        polls = re.search(r'^keytrio_verifier_polls_total\{result="ok"\} (\S+)', text, re.M)
        assert polls is not None and float(polls.group(1)) >= 1, text
        assert '"status": "ok"' in text or '"status":"ok"' in text
        # the counter keeps rising
        url = f"http://127.0.0.1:{w.verifier_metrics}/metrics"
        deadline = time.monotonic() + 20
        while True:
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            now = re.search(r'^keytrio_verifier_polls_total\{result="ok"\} (\S+)', body, re.M)
            if now is not None and float(now.group(1)) > float(polls.group(1)):
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
    finally:
        stopped = w.stop_all()
        subprocess.run([str(KEYTRIO), "testbed", "tpm", "stop", "--dir", str(tpm_dir)], capture_output=True,
                       timeout=30)
    for actor, (rc, log) in stopped.items():
        assert rc == 0, f"{actor} exit {rc}:\n{log}"
        assert STOPPED[actor] in log, f"{actor}:\n{log}"
        assert "Traceback" not in log, f"{actor}:\n{log}"
