"""keytrio as an installed package: one top-level name, data files shipped, verbs that plug in.

The wheel is built from this checkout (pip builds it as a user would, in an isolated build environment) and read as
a zip; the command is run as a real process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYTRIO = Path(sys.executable).parent / "keytrio"


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a copy without build/ and *.egg-info: setuptools reuses what a former build left there
    src = tmp_path_factory.mktemp("src") / "keytrio"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True, capture_output=True, cwd=out,
    )
    (whl,) = out.glob("keytrio-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel(wheel_path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(wheel_path)


def test_the_wheel_occupies_only_the_keytrio_name(wheel: zipfile.ZipFile):
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"keytrio"}, tops


def test_the_wheel_carries_every_module_units_and_samples(wheel: zipfile.ZipFile):
    names = set(wheel.namelist())
    for root in ("actors", "protocol", "testbed", "scenarios"):
        for py in (REPO / root).rglob("*.py"):
            assert f"keytrio/{py.relative_to(REPO).as_posix()}" in names, py
    for unit in ("keytrio-agent.service", "keytrio-registrar.service", "keytrio-verifier.service"):
        assert f"keytrio/deploy/{unit}" in names
    for sample in ("agent.toml", "registrar.toml", "verifier.toml", "tenant.toml"):
        assert f"keytrio/deploy/{sample}" in names
    # the IMA fast path's C extension is built by a plain (not editable) build too
    assert any(n.startswith("keytrio/protocol/_ima_fast.") and n.endswith(".so") for n in names), names


def test_the_wheel_declares_the_command_and_the_plugin_verbs(wheel: zipfile.ZipFile):
    (ep_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = wheel.read(ep_name).decode()
    assert "keytrio = keytrio.actors.cli:main" in entry_points
    assert "[keytrio.verbs]" in entry_points and "keytrio.scenarios.cli:register" in entry_points
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = wheel.read(meta_name).decode()
    assert "Provides-Extra: postgresql" in meta
    psycopg = [line for line in meta.splitlines() if line.startswith("Requires-Dist: psycopg")]
    assert psycopg and all("extra ==" in line for line in psycopg), psycopg


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYTRIO), *args], capture_output=True, text=True, timeout=60, cwd="/")


def test_version_and_completion():
    from keytrio import __version__

    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"keytrio {__version__}"
    assert __version__ != "0+unknown"
    proc = _run("completion", "bash")
    assert proc.returncode == 0
    script = proc.stdout
    assert "complete -o default -F _keytrio keytrio" in script
    # every verb, plugged in or not, and a nested action with its options
    for words in ('"") words="', "agent", "scenario", "testbed", '"tenant add")', "--config"):
        assert words in script, words
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_bash_completes_verbs_and_actions():
    script = _run("completion", "bash").stdout
    probe = script + "\n" + "\n".join(
        f'COMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}; _keytrio; echo "${{COMPREPLY[*]}}"'
        for words in ("keytrio ver", "keytrio tenant st", "keytrio testbed tpm s", "keytrio verifier --conf")
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split() == ["verifier"]
    assert "status" in out[1].split() and "stop" in out[1].split()
    assert sorted(out[2].split()) == ["start", "stop"]
    assert out[3].split() == ["--config"]


def test_service_verbs_never_import_the_testbed():
    code = (
        "import sys; from keytrio.actors import cli\n"
        "for argv in (['verifier', '--help'], ['registrar', '--help'], ['agent', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['keytrio','testbed'], ['keytrio','scenarios'])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_builtin_verbs_are_the_registered_ones():
    from keytrio.actors import cli

    parser = cli.build_parser(plugins=False)
    (verbs,) = [a for a in parser._actions if a.dest == "verb"]
    assert set(verbs.choices) == cli.BUILTIN_VERBS


def test_plugged_in_verbs_work_from_any_directory():
    proc = _run("scenario", "list")
    assert proc.returncode == 0, proc.stderr
    assert "smoke" in proc.stdout
    proc = _run("no-such-verb")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.swtpm
def test_a_plain_install_runs_a_scenario_from_elsewhere(wheel_path: Path, tmp_path: Path):
    """`pip install` of the wheel (not editable) into a fresh venv: no test-only dependency is
    needed at run time, and the smoke scenario runs on a real swtpm from an unrelated directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel_path)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([str(venv / "bin/keytrio"), "scenario", "run", "smoke", "--dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 0 failed" in run.stdout
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = {p.name for p in site.iterdir() if p.name.startswith("keytrio")}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"keytrio"}, ours
    for generic in ("actors", "protocol", "testbed", "scenarios", "deploy"):
        assert not (site / generic).exists(), generic
