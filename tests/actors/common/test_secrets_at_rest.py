"""Secrets at rest: every file that holds a secret is 0600 in 0700 directories whatever the umask,
and an actor refuses to start when its private key is open to group or others (as ssh does).

The umask is the test process's own (``os.umask``; restored after) or the one a subprocess starts
with; the actors, the CA and the testbed run for real (swtpm, SQLite in WAL mode, mTLS).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytrio.actors.ca.authority import Authority
from keytrio.actors.common import tls
from keytrio.actors.common.private_files import private_dir, write_private
from keytrio.actors.tenant.payload import make_payload
from keytrio.testbed.pki import make_cv_ca
from keytrio.testbed.world import Testbed

UMASKS = [0o022, 0o000]
KEYTRIO = [sys.executable, "-m", "keytrio.actors.cli"]


@pytest.fixture(params=UMASKS, ids=lambda u: f"umask{u:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _assert_private(files: list[Path], root: Path) -> None:
    """Each file 0600 (0700 for an executable of a payload), each directory from it up to
    ``root`` (included) 0700."""
    assert files, f"no secret found under {root}"
    wrong = []
    for f in files:
        if _mode(f) not in (0o600, 0o700) or _mode(f) & 0o077:
            wrong.append(f"{f.relative_to(root.parent)}: {_mode(f):04o}")
        d = f.parent
        while True:
            if _mode(d) != 0o700:
                wrong.append(f"{d.relative_to(root.parent)}/: {_mode(d):04o}")
            if d == root:
                break
            d = d.parent
    assert not wrong, "\n".join(sorted(set(wrong)))


def _secrets(root: Path, *patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})


def test_ca_and_testbed_pki_write_private_keys(tmp_path: Path, umask: int):
    ca = Authority.init(tmp_path / "new" / "parents" / "cv_ca")
    ca.issue("ops", "client")
    ca.issue("notifier-2", "revocation")
    keys = _secrets(ca.dir, "*-private.pem")
    assert len(keys) == 6  # CA, server, client, notifier, ops, notifier-2
    _assert_private(keys, tmp_path / "new")  # missing parents are made 0700 too

    files = make_cv_ca(tmp_path / "testbed" / "cv_ca")
    _assert_private([files.server_key, files.client_key, files.revocation_key], tmp_path / "testbed")


def test_ca_cli_in_a_subprocess_whatever_its_umask(tmp_path: Path):
    for umask in UMASKS:
        d = tmp_path / f"ca-{umask:03o}"
        subprocess.run([*KEYTRIO, "ca", "init", "--dir", str(d)], check=True, capture_output=True, umask=umask)
        _assert_private(_secrets(d, "*-private.pem"), d)


def test_private_files_replace_wider_leftovers(tmp_path: Path, umask: int):
    # an older file (or a crash's temporary) with a wide mode never receives the secret as it is
    d = private_dir(tmp_path / "d")
    (d / "key.pem").write_bytes(b"old")
    os.chmod(d / "key.pem", 0o666)
    (d / ".key.pem.tmp").write_bytes(b"leftover")
    os.chmod(d / ".key.pem.tmp", 0o666)
    write_private(d / "key.pem", b"new secret")
    assert (d / "key.pem").read_bytes() == b"new secret"
    assert _mode(d / "key.pem") == 0o600 and not (d / ".key.pem.tmp").exists()


@pytest.mark.swtpm
async def test_a_running_world_keeps_its_secrets_private(tmp_path: Path, umask: int):
    """Registrar and verifier databases (+ -wal, -shm), the agent's NK, AK blobs and unpacked
    payload, the CA's keys: 0600 in 0700 directories, under umask 022 and 000."""
    payload = make_payload(extra={"conf/deep/secret.txt": "s3cret", "run.sh": "#!/bin/sh\n"})
    async with Testbed(tmp_path / "world", machines=1) as tb:
        m = tb.machines[0]
        await tb.enrol(m, payload=payload)
        await tb.wait_count(m, 2)
        world = tb.dir
        registrar = _secrets(world / "registrar", "registrar.sqlite*")
        verifier = _secrets(world / "verifier", "verifier.sqlite*")
        # WAL mode while running: the -wal and -shm files exist and must be as private as the database
        assert {p.name for p in registrar} >= {"registrar.sqlite", "registrar.sqlite-wal", "registrar.sqlite-shm"}
        assert {p.name for p in verifier} >= {"verifier.sqlite", "verifier.sqlite-wal", "verifier.sqlite-shm"}
        _assert_private(registrar, world / "registrar")
        _assert_private(verifier, world / "verifier")
        agent_data = m.dir / "agent-data"
        unpacked = _secrets(agent_data / "secure", "**/*")
        assert any(p.name == "secret.txt" for p in unpacked)
        _assert_private(_secrets(agent_data, "nk-private.pem", "ak.json") + unpacked, agent_data)
        _assert_private(_secrets(world / "cv_ca", "*-private.pem"), world / "cv_ca")
        _assert_private(_secrets(world / "swtpm-localca", "*key*.pem"), world / "swtpm-localca")


# -- an exposed private key: the actor does not start ---------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_tls_contexts_refuse_keys_open_to_others(pki, tmp_path: Path, mode: int):
    key = tmp_path / "key.pem"
    write_private(key, pki.server.key.read_bytes())
    tls.server_context(pki.server.cert, key, client_ca_files=[pki.ca], mode="optional")  # 0600: fine
    os.chmod(key, mode)
    with pytest.raises(tls.UnprotectedKeyError, match=rf"{key}.*group/others.*chmod 600"):
        tls.server_context(pki.server.cert, key, client_ca_files=[pki.ca], mode="optional")
    with pytest.raises(tls.UnprotectedKeyError):
        tls.client_context([pki.ca], pki.server.cert, key)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_key_owned_by_root_may_be_shared_with_a_group_never_with_others(pki, tmp_path: Path):
    """ssh's rule: group access is refused for our own key, allowed for a key another user owns
    (root:keytrio 0640, the service running as keytrio); others' access is always refused."""
    key = tmp_path / "key.pem"
    write_private(key, pki.server.key.read_bytes())
    os.chown(key, 65534, 65534)  # someone else's key (we are root: we can still read it)
    os.chmod(key, 0o640)
    tls.server_context(pki.server.cert, key, client_ca_files=[pki.ca], mode="optional")
    os.chmod(key, 0o644)
    with pytest.raises(tls.UnprotectedKeyError):
        tls.server_context(pki.server.cert, key, client_ca_files=[pki.ca], mode="optional")


def _start_fails(argv: list[str], key: Path, expected_code: int) -> str:
    proc = subprocess.run([*KEYTRIO, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected_code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if str(key) in line]
    assert len(lines) == 1 and "group/others" in lines[0] and f"chmod 600 {key}" in lines[0], proc.stderr
    return lines[0]


def test_actors_refuse_to_start_with_a_key_others_can_read(tmp_path: Path):
    ca = Authority.init(tmp_path / "cv_ca")
    server_key, client_key = ca.dir / "server-private.pem", ca.dir / "client-private.pem"
    common = (f'tls_dir = "{ca.dir}"\nip = "127.0.0.1"\nport = 0\nmetrics_port = -1\n')
    (tmp_path / "registrar.toml").write_text(
        f'[registrar]\ndata_dir = "{tmp_path / "reg"}"\ntls_port = 0\n{common}')
    (tmp_path / "verifier.toml").write_text(
        f'[verifier]\ndata_dir = "{tmp_path / "ver"}"\ntrusted_server_ca = ["cacert.crt"]\n{common}')
    agent_data = private_dir(tmp_path / "agent")
    write_private(agent_data / "nk-private.pem", server_key.read_bytes())
    (tmp_path / "agent.toml").write_text(
        f'[agent]\ndata_dir = "{agent_data}"\ntrusted_client_ca = ["{ca.dir / "cacert.crt"}"]\n')

    os.chmod(server_key, 0o644)
    _start_fails(["registrar", "--config", str(tmp_path / "registrar.toml")], server_key, 12)
    _start_fails(["verifier", "--config", str(tmp_path / "verifier.toml")], server_key, 12)
    os.chmod(server_key, 0o600)
    os.chmod(client_key, 0o640)
    _start_fails(["verifier", "--config", str(tmp_path / "verifier.toml")], client_key, 12)
    _start_fails(["tenant", "status", "--tls-dir", str(ca.dir), "D432FBB3-D2F1-4A97-9EF7-75BD81C00000"],
                 client_key, 2)
    os.chmod(agent_data / "nk-private.pem", 0o644)
    _start_fails(["agent", "--config", str(tmp_path / "agent.toml")], agent_data / "nk-private.pem", 2)
    assert not (tmp_path / "reg").exists() and not (tmp_path / "ver").exists()  # refused before anything
