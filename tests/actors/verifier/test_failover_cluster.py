"""Cluster failover with real processes on a real PostgreSQL (scenarios/cluster_failover.py).

Four ``keytrio verifier`` processes (same verifier_id, cluster = true, lease_ttl 3 s,
quote_interval 1 s; testbed/cluster.py) and eight swtpm machines: the scenario's steps check
the share after three and four verifiers, kill -9 of the outbox holder (every agent attested
again, its pending notice delivered by a survivor), and a verifier cut from the database (it
stops polling before its leases expire, no poll by it after the take-over). Every wait is in
bounded rounds; the figures below are read from the scenario's report notes.
"""

from __future__ import annotations

import ast
import io
import math
import re
from pathlib import Path

import pytest

from keytrio.scenarios import runner
from keytrio.scenarios.cluster_failover import SIZE


@pytest.mark.swtpm
async def test_kill_cut_and_join_on_real_processes(tmp_path: Path) -> None:
    out = io.StringIO()
    results = await runner.run_suite(["cluster-failover"], base_dir=tmp_path, out=out, live=False)
    [result] = results
    assert result.passed, out.getvalue()
    notes = {s.title: s.notes for s in result.steps}
    assert all(s.ok for s in result.steps) and len(result.steps) == 9

    def shares(step_prefix: str) -> dict[str, int]:
        [lines] = [n for t, n in notes.items() if t.startswith(step_prefix)]
        [line] = [x for x in lines if x.startswith("shares: ")]
        return ast.literal_eval(line.removeprefix("shares: "))

    three, four = shares("enrol"), shares("a fourth verifier joins")
    assert sum(three.values()) == SIZE and max(three.values()) <= math.ceil(SIZE / 3) and len(three) == 3
    assert sum(four.values()) == SIZE and max(four.values()) <= math.ceil(SIZE / 4) and four["v3"] > 0

    # the killed one's and the cut one's (n/a when the killed one held only machines that could not
    # be attested before the kill: the failed victim, the machine cut off)
    handovers = [x for lines in notes.values() for x in lines if re.match(r"hand-over( [\d.]+ s|: n/a)", x)]
    assert len(handovers) == 2 and re.match(r"hand-over [\d.]+ s", handovers[1])
    assert all(re.search(r"all \d+ re-attested [\d.]+ s after the event", x) for x in handovers)
    [stopped] = [float(m[1]) for lines in notes.values() for x in lines
                 if (m := re.search(r"stopped polling ([-\d.]+) s before its leases expired", x))]
    assert stopped > 0
    [fence] = [float(m[1]) for lines in notes.values() for x in lines
               if (m := re.search(r"fence stopped its monitors ([-\d.]+) s before its leases expired", x))]
    assert fence > 0
    assert any("no poll by it after the take-over" in x for lines in notes.values() for x in lines)
