"""The scenario runner and the `keytrio` command, end to end (real swtpm, real subprocess)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from keytrio.scenarios import runner


@pytest.mark.swtpm
def test_keytrio_scenario_run_smoke(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "keytrio", "scenario", "run", "smoke", "--dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1 passed, 0 failed" in out
    for forgery in ("forgery 1", "forgery 2", "forgery 3", "forgery 4"):
        assert f"ok    {forgery}" in out
    assert (tmp_path / "smoke" / "ascii_runtime_measurements").is_file()


def test_unknown_scenario_is_a_usage_error():
    from keytrio.scenarios.cli import main

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
    from keytrio.scenarios.cli import main

    d = tmp_path / "tpm"
    assert main(["testbed", "tpm", "start", "--dir", str(d), "--banks", "sha256"]) == 0
    tcti = capsys.readouterr().out.strip()
    assert tcti.startswith("swtpm:")
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    out = subprocess.run(["tpm2_pcrread", "sha256:16"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "16: 0x" + "0" * 64 in out.stdout
    assert main(["testbed", "tpm", "stop", "--dir", str(d)]) == 0
    assert main(["testbed", "tpm", "stop", "--dir", str(d)]) == 1


# --- the suite: every scenario runs here too ---------------------------------------------------------

SCENARIOS = sorted(runner.discover())


@pytest.mark.swtpm
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "smoke"])
async def test_scenario(name: str, tmp_path: Path):
    out = io.StringIO()
    ok = await runner.run_scenarios([name], base_dir=tmp_path, out=out, live=False)
    assert ok, out.getvalue()
    assert "1 passed, 0 failed" in out.getvalue()


def test_live_display_redraws_one_line(tmp_path: Path):
    runner.discover()

    async def quick(run: runner.Run) -> None:
        async with run.step("only step"):
            await trio.sleep(0.3)

    runner.scenario("test-live")(quick)
    out = io.StringIO()
    try:
        ok = trio.run(lambda: runner.run_scenarios(["test-live"], base_dir=tmp_path, out=out, live=True))
    finally:
        del runner._REGISTRY["test-live"]
    text = out.getvalue()
    assert ok
    assert "\r\x1b[K  ..    test-live" in text and "only step" in text
    assert "\r\x1b[K  PASS  test-live" in text
    assert "ok    only step" not in text  # plain lines only when not live


@pytest.mark.swtpm
def test_a_wrong_expectation_fails_the_run(tmp_path: Path, capsys):
    """The policy-pcr-changed scenario, judged against an expectation that it stays trusted."""
    from keytrio.scenarios.cli import main

    registry = runner.discover()
    real = registry["policy-pcr-changed"]
    runner.scenario("test-wrong-expectation", expect={"m0": runner.Expect(events=(), final=3)})(real.fn)
    try:
        rc = main(["scenario", "run", "test-wrong-expectation", "--dir", str(tmp_path)])
    finally:
        del runner._REGISTRY["test-wrong-expectation"]
    out = capsys.readouterr().out
    assert rc == 1
    assert "ok    the verifier marks the quote invalid" in out  # every step held ...
    assert "FAIL  verdict: m0: events ['pcr_validation.invalid_pcr_15'], expected []" in out  # ... the verdict not
    assert "m0: ended in Invalid Quote, expected Get Quote" in out
    assert "0 passed, 1 failed" in out


@pytest.mark.swtpm
async def test_same_seed_same_event_sequences_and_report(tmp_path: Path):
    names = ["policy-pcr-changed", "revocation-all"]
    first = await runner.run_suite(names, base_dir=tmp_path / "a", out=io.StringIO(), seed=77,
                                   json_path=tmp_path / "a.json", report_dir=tmp_path / "report")
    second = await runner.run_suite(names, base_dir=tmp_path / "b", out=io.StringIO(), seed=77)
    assert [r.passed for r in first + second] == [True] * 4
    for a, b in zip(first, second, strict=True):
        assert a.event_sequences == b.event_sequences
        assert a.event_sequences  # something was observed
    assert first[1].event_sequences["m0"] == ["notice:m1:pcr_validation.invalid_pcr_15"]
    suite = json.loads((tmp_path / "a.json").read_text())
    assert suite["seed"] == 77 and suite["passed"] == 2
    assert suite["scenarios"][0]["observed"]["machines"]["m0"]["events"] == ["pcr_validation.invalid_pcr_15"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<svg" in page and "policy-pcr-changed" in page and "pcr_validation.invalid_pcr_15" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
