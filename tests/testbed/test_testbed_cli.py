"""``keytrio testbed up`` as real processes: a second one on a directory in use fails in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from keytrio.actors.common.startup import Exit

KEYTRIO = Path(sys.executable).with_name("keytrio")


def test_second_testbed_up_on_a_used_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
    first = subprocess.Popen([str(KEYTRIO), "testbed", "up", "--dir", str(tmp_path), "--agents", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stderr is not None
        seen = []
        for line in first.stderr:  # blocks until the next line, or EOF if it died
            seen.append(line)
            if "testbed running" in line:
                break
        assert "testbed running" in seen[-1], "".join(seen)
        ca = (tmp_path / "cv_ca" / "cacert.crt").read_bytes()
        r = subprocess.run([str(KEYTRIO), "testbed", "up", "--dir", str(tmp_path), "--agents", "0"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert (r.returncode, r.stdout, len(r.stderr.splitlines())) == (Exit.DATADIR_LOCKED, "", 1), r.stderr
        assert f"testbed directory {tmp_path.resolve()} is in use by a running testbed (pid {first.pid})" in r.stderr
        assert "another --dir" in r.stderr
        assert (tmp_path / "cv_ca" / "cacert.crt").read_bytes() == ca  # the running testbed's CA is untouched
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 0


def test_machine_count_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    # -1 once started a testbed of no machines, 100000000 one that tried to start them all
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
    for count, why in (("-1", "must be 0 to 1000, not -1"), ("1001", "must be 0 to 1000, not 1001"),
                       ("many", "not a whole number: 'many'")):
        r = subprocess.run([str(KEYTRIO), "testbed", "up", "--dir", str(tmp_path / "tb"), "--agents", count],
                           capture_output=True, text=True, timeout=60, env=env)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr.splitlines()[-1] == f"keytrio testbed up: error: argument --agents: {why}"
        assert not (tmp_path / "tb").exists()  # nothing started, nothing written


def test_push_agents_count_is_checked_alone_and_with_the_pull_agents(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
    for args, last in ((["--push-agents", "-2"], "keytrio testbed up: error: argument --push-agents: must be 0 to "
                                                  "1000, not -2"),
                       (["--agents", "600", "--push-agents", "401"],
                        "keytrio testbed up: error: --agents and --push-agents: 1001 machines, at most 1000 "
                        "together")):
        r = subprocess.run([str(KEYTRIO), "testbed", "up", "--dir", str(tmp_path / "tb"), *args],
                           capture_output=True, text=True, timeout=60, env=env)
        assert (r.returncode, r.stdout, r.stderr.splitlines()[-1]) == (2, "", last), r.stderr
        assert not (tmp_path / "tb").exists()  # nothing started, nothing written


def test_ctrl_c_while_the_machines_start_tears_down(tmp_path: Path) -> None:
    """SIGINT during the start (signals were read only once every machine ran, so a start of many
    swtpms could not be stopped) ends the process, and nothing it started is left running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTRIO_")}
    proc = subprocess.Popen([str(KEYTRIO), "testbed", "up", "--dir", str(tmp_path), "--agents", "6"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        machines = tmp_path / "machines"
        for _ in range(600):  # the first machine's directory: the start is under way
            if machines.is_dir() and any(machines.iterdir()):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)  # another process's progress: polled
        assert machines.is_dir() and any(machines.iterdir())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "testbed running" not in err and err.splitlines()[-1] == "testbed stopped", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == [], left  # no swtpm or agent of this testbed outlives it
