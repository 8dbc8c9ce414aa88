"""The push agent's attestation loop on trio's MockClock against a real local HTTPS verifier that
answers as upstream 7.14.3 does (tests/actors/agent/push_verifier.py), with a real swtpm: the
interval the verifier names, 429/503 + Retry-After, exponential backoff while the verifier is
refused or its port is closed, resuming with a new session after it restarts, a session refused
until enrolment, and the token renewed before it expires. Every gap is mock seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.agent.push_client import VerifierClient
from keytrio.actors.agent.push_evidence import EvidenceSource
from keytrio.actors.agent.push_loop import Backoff, PushAttester
from keytrio.actors.agent.tpm import Tpm
from keytrio.actors.common import tls
from keytrio.testbed.netproxy import NetProxy
from tests.actors.agent.push_verifier import PushVerifier

pytestmark = pytest.mark.swtpm

AGENT_ID = "5a5a5a5a-0000-4000-8000-00000000005a"
IMA_LINE = "10 {digest} ima-ng sha256:{file} /usr/bin/tool{n}\n"


@pytest.fixture
def clock() -> MockClock:
    # jumps only after 1 s of real idleness: TLS, swtpm and file reads finish before the clock
    # moves (also on a loaded 2-core CI machine), so every gap measured is a sleep of the loop under test
    return MockClock(autojump_threshold=1.0)


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


class Rig:
    def __init__(self, tpm: Tpm, ak: Any, verifier: PushVerifier, root: Path, pki: Any) -> None:
        self.tpm, self.ak, self.verifier, self.root = tpm, ak, verifier, root
        self.ima = root / "ascii_runtime_measurements"
        self.lines = 0
        (root / "boottime").write_text("1767225600\n")
        self.ima.write_text("")
        self.ctx = tls.client_context([pki.ca])

    def measure(self, count: int = 1) -> None:
        with self.ima.open("a") as f:
            for _ in range(count):
                f.write(IMA_LINE.format(digest="00" * 20, file="11" * 32, n=self.lines))
                self.lines += 1

    def attester(self, *, initial: float = 1.0, maximum: float = 8.0, timeout: float = 30.0,
                 uefi: str = "no-uefi-log", url: str | None = None) -> PushAttester:
        evidence = EvidenceSource(tpm=self.tpm, ak=self.ak, hash_alg="sha256",
                                  boottime_source=self.root / "boottime", ima_ml_path=self.ima,
                                  measuredboot_ml_path=self.root / uefi)
        client = VerifierClient(url or self.verifier.url, self.ctx, timeout=timeout)
        return PushAttester(agent_id=AGENT_ID, client=client,
                            evidence=evidence, interval=60.0, backoff=Backoff(initial, maximum))


@pytest.fixture
async def rig(tpm: Tpm, tmp_path: Path, pki: Any, nursery: trio.Nursery) -> Rig:
    ek = await tpm.endorsement_key()
    ak = await tpm.create_ak(ek)
    verifier = PushVerifier(pki.server.cert, pki.server.key, AGENT_ID, ak.public)
    await verifier.start(nursery)
    r = Rig(tpm, ak, verifier, tmp_path, pki)
    r.measure(3)
    return r


async def test_interval_and_retry_after_are_the_verifiers(rig: Rig, nursery: trio.Nursery, clock: MockClock) -> None:
    v = rig.verifier
    v.script.extend([("capabilities", 429, 13)])
    attester = rig.attester()
    nursery.start_soon(attester.run)
    await attester.wait_for(lambda s: s.accepted >= 2)
    v.script.extend([("capabilities", 503, 5)])
    rig.measure(2)
    await attester.wait_for(lambda s: s.accepted >= 4)

    posts = [s.at for s in v.calls("POST", "/attestations")]
    statuses = [s.status for s in v.calls("POST", "/attestations")]
    # 429 -> Retry-After 13; 202 -> seconds_to_next_attestation 7; 503 -> Retry-After 5; 202 -> 7
    assert statuses[:5] == [429, 201, 201, 503, 201], statuses
    assert gaps(posts[:6]) == [13.0, 7.0, 7.0, 5.0, 7.0], posts
    assert attester.stats.sessions == 1 and attester.stats.failures == 0, attester.stats
    assert v.problems == [], v.problems  # every proof and quote verified, IMA counts right
    # IMA: everything first, then only the lines after the certified ones (2 new ones once)
    assert [a["offset"] for a in v.attestations[:4]] == [0, 3, 3, 5], v.attestations
    assert [a["lines"].count("\n") for a in v.attestations[:4]] == [3, 0, 2, 0], v.attestations
    # the evidence went to the index the 201's Location named
    assert [s.path.rsplit("/", 1)[1] for s in v.calls("PATCH", "/attestations/0")] == ["0"]


async def test_backoff_while_refused_then_resume_with_a_new_session(
    rig: Rig, nursery: trio.Nursery, clock: MockClock
) -> None:
    v = rig.verifier
    attester = rig.attester(initial=1.0, maximum=8.0)
    nursery.start_soon(attester.run)
    await attester.wait_for(lambda s: s.accepted >= 1)
    accepted_at = trio.current_time()
    await v.stop()  # connection refused from now on

    failed_at: list[float] = []
    for n in range(1, 7):
        await attester.wait_for(lambda s, n=n: s.failures >= n)
        failed_at.append(trio.current_time())
    # the first try after the interval (7), then 1, 2, 4, 8, 8 (doubling, capped)
    assert round(failed_at[0] - accepted_at, 6) == 7.0
    assert gaps(failed_at) == [1.0, 2.0, 4.0, 8.0, 8.0], failed_at
    assert "unreachable" in attester.stats.last_error

    before = len(v.seen)
    await v.start(nursery)  # same port, sessions forgotten
    await attester.wait_for(lambda s: s.accepted >= 2)
    # the old token is refused (401) once, then a new session at once, and the cycle completes
    after = [(s.method, s.path.rsplit("/", 1)[-1] if "/sessions/" in s.path else s.path, s.status, s.at)
             for s in v.seen[before:before + 5]]
    sid = v.seen[before + 2].path.rsplit("/", 1)[-1]
    attestations = f"/v3/agents/{AGENT_ID}/attestations"
    assert [a[:3] for a in after] == [("POST", attestations, 401), ("POST", "/v3/sessions", 200), ("PATCH", sid, 200),
                                      ("POST", attestations, 201), ("PATCH", attestations + "/0", 202)], after  # a new verifier counts from 0
    assert round(after[0][3] - failed_at[-1], 6) == 8.0
    assert {a[3] for a in after} == {after[0][3]}  # no wait between the 401 and the new session
    assert attester.stats.sessions == 2 and v.problems == [], (attester.stats, v.problems)
    # success resets the backoff: a later outage starts again at 1 s
    assert attester.backoff.failures == 0


async def test_session_waits_for_enrolment_and_is_renewed_before_expiry(
    rig: Rig, nursery: trio.Nursery, clock: MockClock
) -> None:
    v = rig.verifier
    v.enrolled = False
    v.token_lifetime = 30.0
    v.interval = 7.0
    attester = rig.attester(initial=2.0, maximum=60.0)
    nursery.start_soon(attester.run)
    await attester.wait_for(lambda s: s.failures >= 3)
    assert "not enrolled" in attester.stats.last_error
    v.enrolled = True
    await attester.wait_for(lambda s: s.accepted >= 6)

    proofs = [s for s in v.seen if s.method == "PATCH" and s.path.startswith("/v3/sessions/")]
    # refused three times with backoff 2, 4; then 8 s later the fourth proof passes
    assert gaps([s.at for s in proofs[:4]]) == [2.0, 4.0, 8.0], proofs
    # a token of 30 s is renewed 7.5 s before its end (a quarter of its life): never a 401
    assert attester.stats.sessions >= 2, attester.stats
    assert all(s.status != 401 for s in v.seen), [(s.path, s.status) for s in v.seen]
    posts = [s.at for s in v.calls("POST", "/attestations")]
    assert set(gaps(posts[:6])) == {7.0}, posts
    assert v.problems == []


async def test_blackholed_verifier_times_out_backs_off_and_the_uefi_log_goes_when_asked(
    rig: Rig, nursery: trio.Nursery, clock: MockClock
) -> None:
    """A network cut that swallows packets (the testbed's NetProxy in blackhole mode between agent
    and verifier): every request runs into verifier_timeout (10 s), then the backoff; when the path
    is back the agent resumes by itself. The verifier asks for the UEFI log (as upstream does with a
    measured-boot policy): it goes as base64, whole."""
    proxy = NetProxy(("127.0.0.1", rig.verifier.port))
    await nursery.start(proxy.run)
    uefi = bytes(range(256)) * 5
    (rig.root / "binary_bios_measurements").write_bytes(uefi)
    rig.verifier.want_uefi = True
    attester = rig.attester(initial=1.0, maximum=4.0, timeout=10.0, uefi="binary_bios_measurements",
                            url=f"https://127.0.0.1:{proxy.port}")
    nursery.start_soon(attester.run)
    await attester.wait_for(lambda s: s.accepted >= 1)
    accepted_at = trio.current_time()
    proxy.set_mode("blackhole")

    failed_at: list[float] = []
    for n in range(1, 5):
        await attester.wait_for(lambda s, n=n: s.failures >= n)
        failed_at.append(trio.current_time())
    # the interval (7) and 10 s of silence, then backoff 1, 2, 4 each followed by 10 s of silence
    assert round(failed_at[0] - accepted_at, 6) == 17.0, (accepted_at, failed_at)
    assert gaps(failed_at) == [11.0, 12.0, 14.0], failed_at
    assert "unreachable" in attester.stats.last_error and "Timeout" in attester.stats.last_error

    proxy.set_mode("pass")  # the path is back
    await attester.wait_for(lambda s: s.accepted >= 3)
    assert attester.stats.sessions == 1  # the token outlived the cut
    assert rig.verifier.problems == [], rig.verifier.problems
    assert all(a["uefi"] == uefi for a in rig.verifier.attestations[:3])
    caps = {s["evidence_type"]: s["capabilities"] for s in rig.verifier.capabilities_seen[0]}
    assert caps["uefi_log"]["formats"] == ["application/octet-stream"] and caps["uefi_log"]["entry_count"] == len(uefi)
