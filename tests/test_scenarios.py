"""The scenario runner and the `keytrio` command, end to end (real swtpm, real subprocess)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scenarios import runner


@pytest.mark.swtpm
def test_keytrio_scenario_run_smoke(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "scenario", "run", "smoke", "--dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1 passed, 0 failed" in out
    for forgery in ("forgery 1", "forgery 2", "forgery 3", "forgery 4"):
        assert f"ok    {forgery}" in out
    assert (tmp_path / "smoke" / "ascii_runtime_measurements").is_file()


def test_unknown_scenario_is_a_usage_error():
    from scenarios.cli import main

    assert main(["scenario", "run", "no-such-scenario"]) == 2


async def test_a_failing_step_fails_the_run(tmp_path: Path):
    runner.discover()

    async def broken(run: runner.Run) -> None:
        async with run.step("a step that holds"):
            run.check(True, "never shown")
        async with run.step("a step that does not hold"):
            run.check(1 + 1 == 3, "arithmetic is off")
        async with run.step("never reached"):
            pass

    runner.scenario("test-broken")(broken)
    try:
        out = io.StringIO()
        ok = await runner.run_scenarios(["test-broken"], base_dir=tmp_path, out=out)
    finally:
        del runner._REGISTRY["test-broken"]
    text = out.getvalue()
    assert ok is False
    assert "ok    a step that holds" in text
    assert "FAIL  a step that does not hold" in text and "arithmetic is off" in text
    assert "never reached" not in text
    assert "0 passed, 1 failed" in text


@pytest.mark.swtpm
def test_keytrio_testbed_tpm_start_stop(tmp_path: Path, capsys):
    from scenarios.cli import main

    d = tmp_path / "tpm"
    assert main(["testbed", "tpm", "start", "--dir", str(d), "--banks", "sha256"]) == 0
    tcti = capsys.readouterr().out.strip()
    assert tcti.startswith("swtpm:")
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    out = subprocess.run(["tpm2_pcrread", "sha256:16"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "16: 0x" + "0" * 64 in out.stdout
    assert main(["testbed", "tpm", "stop", "--dir", str(d)]) == 0
    assert main(["testbed", "tpm", "stop", "--dir", str(d)]) == 1
