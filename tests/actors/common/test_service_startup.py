"""Services that fail like services: ``keytrio registrar|verifier|agent`` as real processes.

Every start-up failure is exactly one line on stderr (nothing on stdout) naming the thing and the
fix, with its own exit code (actors/common/startup.py), and nothing is half done before it: a
port in use is found before the database is created or migrated, before the TPM is touched.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common.startup import NO_RESTART, DataDirLock, Exit
from tests.actors.service_support import KEYTRIO, env, one_line, toml, verifier_options, write
from tests.ports import free_port


@contextmanager
def port_in_use() -> Iterator[int]:
    """A port another process (this one) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def run(args: list[str], *, environ: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYTRIO), *args], capture_output=True, text=True, timeout=timeout,
                          env=environ or env(KEYTRIO_CONFIG_DIR="/nonexistent"))


def registrar_options(pki: Any, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "ip": "127.0.0.1", "port": free_port(), "tls_port": free_port(), "metrics_port": -1,
        "data_dir": str(data_dir), "server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
        "trusted_client_ca": [str(pki.ca)], "graceful_timeout": 0.5,
    }
    opts.update(overrides)
    return opts


def test_verifier_port_in_use_fails_before_the_database(tmp_path: Path, pki: Any) -> None:
    data = tmp_path / "verifier"
    with port_in_use() as port:
        conf = write(tmp_path, "verifier", verifier_options(pki, data, port=port))
        line = one_line(run(["verifier", "--config", str(conf)]), Exit.PORT_IN_USE,
                        f"port 127.0.0.1:{port} is already in use", "set port to a free port")
    assert line.startswith("keytrio verifier: ")
    assert not (data / "verifier.sqlite").exists()  # no database made, no migration run


def test_metrics_port_in_use_is_named(tmp_path: Path, pki: Any) -> None:
    data = tmp_path / "registrar"
    with port_in_use() as port:
        conf = write(tmp_path, "registrar", registrar_options(pki, data, metrics_port=port))
        one_line(run(["registrar", "--config", str(conf)]), Exit.PORT_IN_USE, f"metrics_port 127.0.0.1:{port}")
    assert not (data / "registrar.sqlite").exists()


def test_missing_and_invalid_tls_files(tmp_path: Path, pki: Any) -> None:
    missing = tmp_path / "nowhere" / "server.pem"
    conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", server_cert=str(missing)))
    one_line(run(["verifier", "--config", str(conf)]), Exit.TLS, f"server_cert {missing}: no such file")

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    garbage.chmod(0o600)  # a key open to others is refused before it is read (below)
    conf = write(tmp_path, "registrar", registrar_options(pki, tmp_path / "r", server_key=str(garbage)))
    one_line(run(["registrar", "--config", str(conf)]), Exit.TLS, "TLS files do not load", str(garbage))
    assert not (tmp_path / "r" / "registrar.sqlite").exists()

    exposed = tmp_path / "exposed-key.pem"
    exposed.write_bytes(Path(pki.server.key).read_bytes())
    exposed.chmod(0o644)
    conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", server_key=str(exposed)))
    one_line(run(["verifier", "--config", str(conf)]), Exit.TLS, f"server_key: private key {exposed}",
             f"chmod 600 {exposed}")


def test_unreachable_postgresql(tmp_path: Path, pki: Any) -> None:
    url = f"postgresql+psycopg://keytrio:s3cret@127.0.0.1:{free_port()}/keytrio"  # nothing listens there
    conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", database_url=url))
    line = one_line(run(["verifier", "--config", str(conf)]), Exit.DATABASE, "unreachable", "start the database")
    assert "s3cret" not in line  # the password is never printed


def test_database_urls_that_cannot_work(tmp_path: Path, pki: Any) -> None:
    """The service and its `db` command on database_urls that once ended in a traceback (a
    directory, a name too long: OSError from the file checks; `db` on a missing driver) or that
    ran a verifier whose every agent a restart loses (in-memory SQLite): one line each."""
    (tmp_path / "a_dir").mkdir()
    cases = [
        (f"sqlite:///{tmp_path / 'a_dir'}", Exit.DATABASE, "Is a directory"),
        (f"sqlite:///{tmp_path / ('a' * 300)}", Exit.DATABASE, "File name too long"),
        ("mysql://u@h/x", Exit.CONFIG, "no database driver"),
        ("sqlite://", Exit.CONFIG, "database_url: an in-memory SQLite database loses every agent"),
        ("sqlite:///:memory:", Exit.CONFIG, "database_url: an in-memory SQLite database loses every agent"),
    ]
    for url, code, needle in cases:
        conf = write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", database_url=url))
        one_line(run(["verifier", "--config", str(conf)]), code, needle)
        one_line(run(["verifier", "--config", str(conf), "db", "upgrade"]), code, needle)
    assert not (tmp_path / "v" / "verifier.sqlite").exists()


def test_locked_data_dir_and_quiet_start(tmp_path: Path, pki: Any) -> None:
    """A verifier runs; a second one on the same data dir (another port) fails in one line."""
    data = tmp_path / "verifier"
    first = write(tmp_path, "verifier", verifier_options(pki, data), "first")
    second = write(tmp_path, "verifier", verifier_options(pki, data), "second")
    proc = subprocess.Popen([str(KEYTRIO), "verifier", "--config", str(first)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env())
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until the next line (or EOF if it died)
            lines.append(line)
            if "event=verifier.started" in line:
                break
        assert "event=verifier.started" in lines[-1], "".join(lines)
        line = one_line(run(["verifier", "--config", str(second)]), Exit.DATADIR_LOCKED,
                        f"data_dir {data} is in use by another instance (pid {proc.pid})")
        assert "own data_dir" in line
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    text = "".join(lines) + proc.stderr.read()
    # library chatter (alembic's "Context impl", "Running upgrade") stays below INFO
    assert "alembic" not in text and "Running upgrade" not in text, text
    assert [ln for ln in text.splitlines() if " INFO " not in ln] == [], text


def test_lock_held_by_another_process_is_released_when_it_ends(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from keytrio.actors.common.startup import DataDirLock; "
            "DataDirLock(Path(sys.argv[1]), 'agent').acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(Exception) as info:
            DataDirLock(tmp_path, "agent").acquire()
        assert getattr(info.value, "code", None) == Exit.DATADIR_LOCKED
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait()
    DataDirLock(tmp_path, "agent").acquire().release()


def test_agent_unreachable_tpm_and_port_in_use(tmp_path: Path, pki: Any) -> None:
    base = {"ip": "127.0.0.1", "trusted_client_ca": [str(pki.ca)], "metrics_port": -1, "secure_mount": "never"}
    conf = write(tmp_path, "agent", {**base, "port": free_port(), "data_dir": str(tmp_path / "a1"),
                                     "tcti": "swtpm:path=/nonexistent/swtpm.sock"})
    one_line(run(["agent", "--config", str(conf)]), Exit.TPM, "TPM unreachable at tcti 'swtpm:path=/nonexistent")

    with port_in_use() as port:
        conf = write(tmp_path, "agent", {**base, "port": port, "data_dir": str(tmp_path / "a2"),
                                         "tcti": "swtpm:path=/nonexistent/swtpm.sock"})
        # the port is checked before the TPM: the port is reported, not the (also missing) TPM
        one_line(run(["agent", "--config", str(conf)]), Exit.PORT_IN_USE, f"port 127.0.0.1:{port}")
    assert sorted(p.name for p in (tmp_path / "a2").iterdir()) == ["agent.lock"]  # no key made

    missing = tmp_path / "no-ca.pem"
    conf = write(tmp_path, "agent", {**base, "port": free_port(), "data_dir": str(tmp_path / "a3"),
                                     "trusted_client_ca": [str(missing)]})
    one_line(run(["agent", "--config", str(conf)]), Exit.TLS, f"trusted_client_ca {missing}: no such file")


async def test_agent_registration_failure(tmp_path: Path, pki: Any, swtpm: Any) -> None:
    """A registrar that never answers: exit 18 (restartable), the failure as the last line."""
    conf = write(tmp_path, "agent", {
        "ip": "127.0.0.1", "port": free_port(), "metrics_port": -1, "trusted_client_ca": [str(pki.ca)],
        "secure_mount": "never", "data_dir": str(tmp_path / "agent"), "tcti": swtpm.tcti,
        "registrar_ip": "127.0.0.1", "registrar_port": free_port(), "max_retries": 0,
        "ima_ml_path": str(tmp_path / "no-ima"), "measuredboot_ml_path": str(tmp_path / "no-uefi"),
    })
    r = await trio.to_thread.run_sync(lambda: run(["agent", "--config", str(conf)]))
    assert r.returncode == Exit.REGISTRATION and Exit.REGISTRATION not in NO_RESTART, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("keytrio agent: registration failed") and " -- " in last, r.stderr


def test_bad_configuration_and_json_format(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    one_line(run(["registrar", "--config", str(missing)]), Exit.CONFIG, f"{missing}: no such file")
    r = run(["verifier", "--config", str(missing), "--log-format", "json"])
    assert (r.returncode, r.stdout, len(r.stderr.splitlines())) == (Exit.CONFIG, "", 1), r.stderr
    doc = json.loads(r.stderr)
    assert doc["exit_code"] == Exit.CONFIG and "no such file" in doc["message"] and doc["level"] == "CRITICAL"


def test_unexpandable_paths_and_non_finite_numbers_are_configuration_errors(tmp_path: Path, pki: Any) -> None:
    """What TOML lets an operator write that once ended a start in a traceback: ``~user`` of a user
    the machine does not have (pathlib raises RuntimeError), ``port = inf`` (int(inf) raises
    OverflowError); and ``nan``, which every minimum/maximum check let through."""
    for actor in ("registrar", "verifier", "agent"):
        conf = write(tmp_path, actor, {"data_dir": "~keytrio-no-such-user/x"})
        one_line(run([actor, "--config", str(conf)]), Exit.CONFIG,
                 "data_dir: cannot expand '~keytrio-no-such-user/x': no such user or home directory")
    conf = tmp_path / "verifier-nan.toml"
    conf.write_text("[verifier]\nport = inf\nquote_interval = nan\n")
    one_line(run(["verifier", "--config", str(conf)]), Exit.CONFIG,
             "port: must be an integer, not inf", "quote_interval: must be a finite number, not nan")


def test_default_config_file_is_read(tmp_path: Path, pki: Any) -> None:
    """Without --config the actor reads $KEYTRIO_CONFIG_DIR/<actor>.toml (default /etc/keytrio)."""
    with port_in_use() as port:
        write(tmp_path, "verifier", verifier_options(pki, tmp_path / "v", port=port))
        r = run(["verifier"], environ=env(KEYTRIO_CONFIG_DIR=str(tmp_path)))
        one_line(r, Exit.PORT_IN_USE, f"127.0.0.1:{port}")  # the port came from that file
    # the tenant too: its connection settings come from tenant.toml, so `tenant status ID` works bare
    nobody = free_port()
    (tmp_path / "tenant.toml").write_text(toml("tenant", {
        "registrar_ip": "127.0.0.1", "registrar_tls_port": nobody, "verifier_ip": "127.0.0.1",
        "verifier_port": nobody, "tls_dir": str(tmp_path / "cv_ca"),
        "trusted_server_ca": [str(pki.ca)], "client_cert": str(pki.client.cert), "client_key": str(pki.client.key),
    }))
    r = run(["tenant", "status", "d432fbb3-d2f1-4a97-9ef7-75bd81c0a9e1"], environ=env(KEYTRIO_CONFIG_DIR=str(tmp_path)))
    assert r.returncode == 3 and f"('127.0.0.1', {nobody})" in r.stderr, r.stderr


def test_help_lists_exit_codes_and_units_do_not_restart_them() -> None:
    repo = Path(__file__).resolve().parents[3]
    for actor in ("registrar", "verifier", "agent"):
        text = run([actor, "--help"]).stdout
        assert "/etc/keytrio/" + actor + ".toml" in text and "--log-format" in text
        for code in Exit:
            assert f"  {int(code):>3}  " in text, (actor, code)
        unit = (repo / "deploy" / f"keytrio-{actor}.service").read_text()
        prevent = next(ln for ln in unit.splitlines() if ln.startswith("RestartPreventExitStatus="))
        assert sorted(int(c) for c in prevent.split("=", 1)[1].split()) == sorted(int(c) for c in NO_RESTART)


def test_fixed_default_metrics_ports() -> None:
    """Documented defaults (README "Ports"); 0 stays "any free port" when set explicitly."""
    from keytrio.actors.agent import config as agent_config
    from keytrio.actors.registrar.config import load_config as registrar_config
    from keytrio.actors.verifier.config import load_config as verifier_config

    assert registrar_config(None, env={}).metrics_port == 8892
    assert verifier_config(None, env={}).metrics_port == 8882
    assert agent_config.load(None, env={}).metrics_port == 9003
    assert verifier_config(None, env={"KEYTRIO_VERIFIER_METRICS_PORT": "0"}).metrics_port == 0
