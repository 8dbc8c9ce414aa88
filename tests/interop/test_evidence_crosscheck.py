"""Direction 4 of issue 9: the same evidence to upstream Keylime 7.14.3's ``POST /v2.5/verify/evidence``
and to ours; same HTTP status class, same ``valid``, same set of failure types.

The evidence is real (evidence_cases.py: quotes from a swtpm through ``actors.agent.tpm.Tpm``, IMA
lists written by ``testbed.ima_log.ImaLog`` that extend PCR 10), made once per module together
with both verdicts of every case: one sync module fixture runs a trio loop that provisions the
swtpm, starts our Verifier actor (a ``keytrio ca init`` CA in upstream's ``cv_ca`` layout) and
posts each case to both verifiers. The route is public on both: no client certificate is sent.

One parametrized test per case then compares the recorded answers: both verdicts are asserted
exactly, upstream's against the recorded one (which differs from keytrio's only where upstream
contradicts the security intent, ``upstream-defect``, or keytrio differs on purpose,
``deliberate``; docs/compatibility.md lists them) and keytrio's against the intent.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from keytrio.actors.ca.authority import Authority
from keytrio.actors.common import tls
from keytrio.actors.verifier import config as verifier_config
from keytrio.actors.verifier.actor import Verifier
from keytrio.testbed import swtpm as swtpm_mod
from keytrio.testbed import swtpm_state
from tests.interop.evidence_cases import (
    Answer,
    Case,
    Material,
    Verdict,
    build_cases,
    build_material,
    placeholder_material,
)
from tests.interop.support import Upstream

pytestmark = [pytest.mark.interop, pytest.mark.swtpm]

@dataclass
class CrossCheck:
    material: Material
    cases: dict[str, Case]
    upstream: dict[str, Answer]
    ours: dict[str, Answer]


async def _post(client: httpx.AsyncClient, url: str, case: Case) -> Answer:
    body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    resp = await client.post(url, content=body, headers={"Content-Type": case.content_type})
    try:
        parsed = resp.json()
    except ValueError:
        parsed = resp.text
    return Answer(resp.status_code, parsed, Verdict.of(resp.status_code, parsed))


async def cross_check(upstream: Upstream, root: Path, swtpm_template: Path | None = None) -> CrossCheck:
    """Make the evidence, start our verifier, post every case to both verifiers."""
    state = root / "swtpm"
    if swtpm_template is not None:
        swtpm_state.copy_state(swtpm_template, state)
    async with swtpm_mod.swtpm_running(state, banks=("sha1", "sha256")) as sw:
        material = await build_material(sw.tcti, root / "ascii_runtime_measurements")
    cases = {c.name: c for c in build_cases(material)}

    ca_dir = root / "cv_ca"
    Authority.init(ca_dir)  # `keytrio ca init`: upstream's cv_ca file names
    cfg = verifier_config.load_config(env={}, overrides={
        "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "data_dir": str(root / "verifier"), "tls_dir": str(ca_dir),
        "ignore_tomtou_errors": False,  # as up.sh configures upstream's verifier
    })
    answers: dict[str, dict[str, Answer]] = {"upstream": {}, "ours": {}}
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(Verifier(cfg).run)
        targets = {
            "upstream": (f"{upstream.verifier_url}/v2.5/verify/evidence", upstream.ca.ca),
            "ours": (f"https://{host}:{port}/v2.5/verify/evidence", ca_dir / "cacert.crt"),
        }

        async def send_all(side: str) -> None:
            url, ca = targets[side]
            # no client certificate: /verify/evidence is public on both
            async with httpx.AsyncClient(verify=tls.client_context([ca]), timeout=30.0) as client:
                for case in cases.values():
                    answers[side][case.name] = await _post(client, url, case)

        async with trio.open_nursery() as senders:
            senders.start_soon(send_all, "upstream")
            senders.start_soon(send_all, "ours")
        nursery.cancel_scope.cancel()
    return CrossCheck(material, cases, answers["upstream"], answers["ours"])


@pytest.fixture(scope="module")
def crosscheck(upstream: Upstream, swtpm_template: Path) -> Iterator[CrossCheck]:
    # a sync fixture with its own trio loop: every case's answers are fetched once for the module
    with tempfile.TemporaryDirectory(prefix="keytrio-evidence-") as d:
        yield trio.run(cross_check, upstream, Path(d), swtpm_template)


def _case_names() -> list[str]:
    # parametrization happens at collection time, before any evidence exists: names only
    return [c.name for c in build_cases(placeholder_material())]


@pytest.mark.parametrize("name", _case_names())
def test_evidence_crosscheck(crosscheck: CrossCheck, name: str) -> None:
    case = crosscheck.cases[name]
    up, ours = crosscheck.upstream[name], crosscheck.ours[name]
    print(f"[{name}] upstream {up.describe()}\n[{name}] keytrio  {ours.describe()}")  # shown on failure

    # upstream: the verdict the intent asks for, or its recorded (documented) difference
    assert up.verdict == case.upstream_verdict, (
        f"upstream's verdict changed: expected {case.upstream_verdict.show()}, got {up.describe()}")
    assert ours.verdict == case.expect, f"keytrio: expected {case.expect.show()}, got {ours.describe()}"
    if not case.kind:
        assert ours.verdict == up.verdict
