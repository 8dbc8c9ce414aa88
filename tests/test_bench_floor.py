"""The floors (bench.floor_pull, bench.floor_push): measuring instruments that must still check.

A floor that skipped a check would understate what a poll or a push attestation costs, so the
checks they share (bench.floor_serve) are tried here on real software-signed quotes of the
simulated agents, good and forged; and a tiny ``bench.sim_fleet`` run has their rows next to
keytrio's, every agent attested by each and a tampered one failed. Nothing here is timed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import floor_serve, gen, sim_agent, sim_keys
from bench.floor_serve import Seen
from keytrio.protocol import ima, pcr_blob, tpm2
from keytrio.testbed.pki import make_cv_ca

GUARD = 300.0  # seconds: a hang guard, never what a test asserts
POLICY_FILES = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> sim_agent.SimAgent:
    ca = make_cv_ca(tmp_path_factory.mktemp("ca") / "cv_ca").dir
    sims = sim_agent.SimAgents(ca / "cacert.crt", sim_keys.PrimePool(1), POLICY_FILES,
                               tmp_path_factory.mktemp("sim"))
    (a,) = sims.grow(1)
    return a


def _policy(a: sim_agent.SimAgent) -> dict[str, set[str]]:
    doc = gen.policy_doc([gen.entry_for(i) for i in range(POLICY_FILES)])
    policy = {path: set(d) for path, d in doc["digests"].items()}
    policy["boot_aggregate"] = {a.entries[0].digest.hex()}
    return policy


def _parts(quote: str) -> list[bytes]:
    return [base64.b64decode(p) for p in quote[1:].split(":")]


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]


def test_check_quote_passes_a_good_quote_and_refuses_each_forgery(agent: sim_agent.SimAgent) -> None:
    ak = tpm2.ak_key(agent.ak_public.marshal())
    pcrs = (10, 16)
    message, signature, blob = _parts(agent.quote(b"nonce-1", set(pcrs)))
    seen = Seen()
    failure, values, clock = floor_serve.check_quote(ak, message, signature, blob, b"nonce-1", pcrs, seen)
    assert failure is None and values == {10: agent.pcrs[10], 16: agent.pcrs[16]} and clock > 0
    assert floor_serve.check_quote(ak, message, signature, blob, b"nonce-2", pcrs, seen)[0] == "nonce"
    assert floor_serve.check_quote(ak, message, signature, blob, b"nonce-1", (10,), seen)[0] == "selection"
    # a PCR value changed in the blob: its digest is not the quote's
    moved = pcr_blob.encode({"sha256": {10: _flip(agent.pcrs[10], 0), 16: agent.pcrs[16]}})
    assert floor_serve.check_quote(ak, message, signature, moved, b"nonce-1", pcrs, seen)[0] == "pcr digest"
    # one bit of the signed structure (the clock) or of the signature: the RSA check refuses it
    assert floor_serve.check_quote(ak, _flip(message, len(message) - 50), signature, blob, b"nonce-1", pcrs,
                                   seen)[0] == "signature"
    assert floor_serve.check_quote(ak, message, _flip(signature, 20), blob, b"nonce-1", pcrs, seen)[0] == "signature"
    # another agent's AK
    other = tpm2.ak_key(sim_keys.ak_public(sim_keys.PrimePool(1).key(1)).marshal())
    assert floor_serve.check_quote(other, message, signature, blob, b"nonce-1", pcrs, seen)[0] == "signature"
    # a TPM clock behind the last good one
    assert floor_serve.check_quote(ak, message, signature, blob, b"nonce-1", pcrs,
                                   Seen(clock=clock + 1))[0] == "clock"


def test_check_ima_replays_the_tail_against_the_policy_and_pcr_10(agent: sim_agent.SimAgent) -> None:
    policy, pcr10 = _policy(agent), agent.pcrs[10]
    seen = Seen()
    head, tail = "".join(agent.lines[:3]), "".join(agent.lines[3:])
    mid = ima.replay(agent.entries[:3], "sha256")
    assert floor_serve.check_ima(seen, head, 0, mid, policy) is None and seen.next_line == 3
    assert floor_serve.check_ima(seen, tail, 3, pcr10, policy) is None and seen.next_line == len(agent.lines)
    assert floor_serve.check_ima(seen, "", seen.next_line, pcr10, policy) is None  # a steady poll
    assert floor_serve.check_ima(seen, "", seen.next_line, bytes(32), policy) == "PCR 10 moved without IMA lines"
    # a line the policy does not allow (its digest changed; the PCR still the original's)
    forged = dataclasses.replace(agent.entries[-1], digest=b"\x01" * 32)
    lines = [*agent.lines[:-1], ima.format_line(forged) + "\n"]
    assert "not in the policy" in (floor_serve.check_ima(Seen(), "".join(lines), 0, pcr10, policy) or "")
    # a good list that the quoted PCR 10 never saw
    assert floor_serve.check_ima(Seen(), "".join(agent.lines), 0, mid, policy) == "PCR 10 is not the IMA log's replay"
    assert "starts at line 2" in (floor_serve.check_ima(Seen(), tail, 2, pcr10, policy) or "")


def test_sim_fleet_floor_rows_attest_every_agent(tmp_path: Path) -> None:
    """``bench.sim_fleet --pull-floor --push --push-floor full,bare`` at a tiny size: a pull floor
    row and two push floor rows next to keytrio's, each counting polls (quotes served) or
    attestations (202s) that all passed, every agent attesting."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.sim_fleet", "--out", str(out), "--sizes", "4", "--seconds", "2",
           "--quote-interval", "1", "--register", "2", "--policy-files", str(POLICY_FILES), "--push",
           "--pull-floor", "--push-floor", "full,bare", "--enrol-concurrency", "4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=GUARD)  # a hang guard only
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    report = json.loads((out / "sim_fleet.json").read_text())
    assert report["stopped"] == {}, report["stopped"]
    (row,) = report["rows"]
    pull = row["pull floor"]
    assert pull["states"] == {"3": 4} and pull["polls_counted_by"] == "served", pull
    # the CPU is read in clock ticks (10 ms): a few polls of a floor may round to none of them
    assert pull["polls"] > 0 and pull["polls_committed"] > 0 and pull["cpu_per_poll"] >= 0, pull
    for name in ("push floor", "push floor (bare)"):
        r = row[name]
        assert r["states"] == {"3": 4} and r["agent_errors"] == {}, r
        assert r["polls"] > 0 and r["passed"] > 0 and r["cpu_per_poll"] >= 0, r
    assert "| 4 | push floor (bare) |" in done.stdout and "| 4 | pull floor |" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.sim_fleet", "--out", str(out), "--push-floor", "half"],
                         cwd=REPO, capture_output=True, text=True, timeout=GUARD)  # fmt: skip
    assert bad.returncode == 2 and "expected full, bare or full,bare" in bad.stderr
    alone = subprocess.run([sys.executable, "-m", "bench.sim_fleet", "--out", str(out), "--push-floor", "bare"],
                           cwd=REPO, capture_output=True, text=True, timeout=GUARD)  # fmt: skip
    assert alone.returncode == 2 and "--push-floor needs --push" in alone.stderr
