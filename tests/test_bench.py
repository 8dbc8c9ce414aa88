"""Smoke test of the benchmark driver on tiny inputs: both interpreters, both verifiers, both
registrars, a fleet of two agents.

Asserts only that the run completes and the JSON report has the right shape (valid verdicts are
enforced by the driver itself: it fails the run if a timed call is invalid or a tampered control
valid). Never asserts anything about timings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import driver
from tests.interop.conftest import upstream  # noqa: F401 - the session fixture (up.sh)
from tests.interop.support import KL_VENV, Upstream

pytestmark = [pytest.mark.swtpm, pytest.mark.interop]


def _summary_ok(s: dict[str, Any]) -> None:
    assert set(s) >= {"n", "median", "p10", "p90"}
    assert s["n"] > 0
    assert all(isinstance(s[k], float) and math.isfinite(s[k]) and s[k] > 0 for k in ("median", "p10", "p90"))
    assert s["p10"] <= s["median"] <= s["p90"]


def _compared_ok(c: dict[str, Any]) -> None:
    _summary_ok(c["keytrio"])
    _summary_ok(c["upstream"])
    assert c["ratio"] > 0 and math.isfinite(c["ratio"])
    for side in ("keytrio", "upstream"):
        assert len(c["samples"][side]) == c[side]["n"]


def test_quick_driver_on_tiny_inputs(tmp_path: Path, upstream: Upstream) -> None:  # noqa: F811
    out = tmp_path / "bench"
    rc = driver.main([
        "--out", str(out), "--quick", "--sizes", "0,20,60", "--polls", "4", "--lines-per-poll", "2",
        "--kl-venv", str(KL_VENV), "--upstream-dir", str(upstream.dir), "--http-seconds", "1",
        "--http-bodies", "4,6", "--concurrency", "2", "--reg-rounds", "2", "--reg-per-round", "4", "--reg-concurrency", "2",
        "--fleet-sizes", "2", "--fleet-seconds", "3", "--fleet-policy-files", "200",
    ])  # fmt: skip
    assert rc == 0, (out / "worker-upstream.log").read_text()[-3000:] if (out / "worker-upstream.log").exists() else ""
    report = json.loads((out / "bench.json").read_text())

    assert report["upstream_version"] == "7.14.3"
    assert set(report["pythons"]) == {"keytrio", "upstream"}
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"] is not None

    ev = report["evidence"]
    assert [c["lines"] for c in ev["cases"]] == [0, 20, 60]
    for c in ev["cases"]:
        _compared_ok(c)
        _compared_ok(c["wall"] | {"samples": c["wall_samples"]})
    assert ev["controls"] == {side: {"tampered_ima_line": "invalid", "wrong_nonce": "invalid"}
                              for side in ("keytrio", "upstream")}

    poll = report["poll"]
    _compared_ok(poll)
    assert poll["base_lines"] == 60 and poll["new_lines_per_poll"] == 2
    assert len(poll["samples"]["keytrio"]) == len(poll["samples"]["upstream"]) == 4

    http = report["http"]
    assert [c["ima_lines"] for c in http["cases"]] == [3, 11]  # one case per --http-bodies size
    for c in http["cases"]:
        assert c["rps"]["keytrio"] > 0 and c["rps"]["upstream"] > 0
        # the servers' CPU per request (clock ticks: may round to 0 over the tiny windows here)
        assert c["cpu_per_request"]["keytrio"] >= 0 and c["cpu_per_request"]["upstream"] >= 0
        assert c["controls"]["keytrio"]["valid"] in (False, 0) and c["controls"]["upstream"]["valid"] in (False, 0)
        _summary_ok(c["latency"]["keytrio"])
        _summary_ok(c["latency"]["upstream"])

    reg = report["registration"]
    for phase in ("reg", "act"):
        assert reg[phase]["ok"] == {"keytrio": 8, "upstream": 8}  # every registration/activation answered 200
        assert reg[phase]["rate"]["keytrio"] > 0 and reg[phase]["rate"]["upstream"] > 0
        _summary_ok(reg[phase]["latency"]["keytrio"])
        _summary_ok(reg[phase]["latency"]["upstream"])
    assert reg["errors"] == {"keytrio": {}, "upstream": {}}
    for side in ("keytrio", "upstream"):  # same id with another AK refused; a wrong auth tag never activates
        assert reg["controls"][side]["other_ak_same_id"] == 403
        assert reg["controls"][side]["wrong_auth_tag"] != 200

    fleet = report["fleet"]
    assert fleet["stopped"] == {}
    (row,) = fleet["rows"]
    assert row["n"] == 2
    for side in ("keytrio", "upstream"):
        r = row[side]
        assert r["n"] == 2 and r["attested_at_start"] == 2
        assert r["polls"] > 0 and r["achieved_rate"] > 0 and r["cpu_per_poll"] > 0
        assert r["rss_mb"] > 0 and math.isfinite(r["rss_per_agent_kb"])

    tables = (out / "tables.md").read_text()
    for heading in ("### 1. Evidence check", "### 2. Steady-state poll", "### 3. Evidence endpoint",
                    "### 4. Fleet", "### 5. Registration"):
        assert heading in tables
