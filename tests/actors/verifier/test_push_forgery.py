"""Forged push evidence never passes: a seeded random walk of evidence changed after it was signed.

A real push verifier (TLS, SQLite, MockClock) and one software push agent whose IMA list grows by a
line each cycle (really extended into its PCR 10, every line allowed by the policy). Each cycle
builds good evidence, then (three cycles in four) changes it the way an attacker on the wire or a
lying agent could without the AK's private key: one bit of the signed TPMS_ATTEST, one bit of the
signature, one bit of a PCR value inside ``subject_data`` (the blob re-encoded, so the change is
always in a value, never in padding the decoder skips), one character of an IMA line, or an IMA line
repeated (a replay of a measurement the PCR never saw). A forged submission must be refused at the
door (4xx) or accepted (202) and then fail; it may never pass. Every fourth cycle is left as built
and must pass, so a failure of the others is the forgery's, not the harness's. Some cycles carry a
long IMA tail, which the verifier checks after the 202 instead of in the evidence transaction: both
paths are walked.
"""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import trio
from trio.testing import MockClock

from keytrio.protocol import pcr_blob
from tests.actors.verifier.push_support import BANK, PATHS, A, SoftAgent, enrolled, entry, start, verdict

CYCLES = 96
BIG = 80  # lines appended at once now and then: above verify.INLINE_IMA_BYTES, checked after the 202


def _flip_b64(text: str, rng: random.Random) -> str:
    raw = bytearray(base64.b64decode(text))
    i = rng.randrange(len(raw))
    raw[i] ^= 1 << rng.randrange(8)
    return base64.b64encode(bytes(raw)).decode()


def forge(body: dict[str, Any], rng: random.Random) -> str:
    """Change ``body`` (evidence as built and signed) in place; -> what was changed."""
    items = body["data"]["attributes"]["evidence_collected"]
    quote = next(i for i in items if i["evidence_type"] == "tpm_quote")["data"]
    log = next(i for i in items if i["evidence_type"] == "ima_log")["data"]
    kinds = ["message", "signature", "pcr value"] + (["ima char", "ima replay"] if log["entries"] else [])
    kind = rng.choice(kinds)
    if kind in ("message", "signature"):
        quote[kind] = _flip_b64(quote[kind], rng)
    elif kind == "pcr value":
        banks = pcr_blob.decode(base64.b64decode(quote["subject_data"]))
        values = dict(banks[BANK])
        pcr = rng.choice(sorted(values))
        raw = bytearray(values[pcr])
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        values[pcr] = bytes(raw)
        quote["subject_data"] = base64.b64encode(pcr_blob.encode({BANK: values})).decode()
        kind += f" {pcr}"
    elif kind == "ima char":
        lines = log["entries"].splitlines(keepends=True)
        k = rng.randrange(len(lines))
        j = rng.randrange(len(lines[k]) - 1)  # not the newline
        old = lines[k][j]
        # never the same character in another case: "AB" and "ab" are one digest to a hex parser
        new = rng.choice([c for c in "0123456789abcdefghijklmnopqrstuvwxyz/._-: " if c != old.lower()])
        lines[k] = lines[k][:j] + new + lines[k][j + 1:]
        log["entries"] = "".join(lines)
        kind += f" line {k} col {j} {old!r}->{new!r}"
    else:
        # a line the PCR never saw: inside the tail it breaks the replay; after its end it is a line
        # measured after the quote (the log grows while the agent reads it), so the quote covers
        # the lines before it, which pass, and the verifier asks again from there (checked below)
        orig = log["entries"].splitlines(keepends=True)
        lines = list(orig)
        at = rng.randrange(len(lines) + 1)
        lines.insert(at, rng.choice(lines))
        log["entries"], log["entry_count"] = "".join(lines), len(lines)
        # the sent tail still starts with the real one (the copy went last, or next to itself)
        kind = "ima extra line at the end" if lines[:len(orig)] == orig else f"ima extra line at {at}"
    return kind


async def test_forged_evidence_is_refused_or_fails_and_never_passes(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rng = random.Random(20261205)
    # no commit linger: each cycle's two writes commit at once (fewer MockClock jumps to wait for)
    rv = await start(nursery, tmp_path, pki, clock, commit_linger=0.0, push_commit_linger=0.0)
    a: SoftAgent = await enrolled(rv, pki)
    seen: dict[str, int] = {}
    covered: int | None = None  # the IMA offset the next cycle must ask for, when checked
    kinds: set[str] = set()
    for n in range(CYCLES):
        # the machine measures more files: one line, or now and then a long tail
        for _ in range(BIG if n % 16 == 5 else 1):
            a.entries.append(entry(PATHS[rng.randrange(len(PATHS))]))
        caps = await a.post_capabilities()
        if caps.status_code in (401, 403) and n:  # the failed agent's token: a new session
            assert (await a.open_session()).status_code == 200 and a.token
            caps = await a.post_capabilities()
        assert caps.status_code == 201, caps.text
        index = int(caps.headers["Location"].rsplit("/", 1)[1])
        requested = caps.json()["data"]["attributes"]["evidence_requested"]
        if covered is not None:  # after a line appended past the quote: asked again from the quoted end
            (offset,) = [r["chosen_parameters"]["starting_offset"] for r in requested
                         if r["evidence_type"] == "ima_log"]
            assert offset == covered, (n, offset, covered)
            covered = None
        body = a.evidence(requested)
        forged = n % 4 != 0
        what = forge(body, rng) if forged else "as built"
        if what == "ima extra line at the end":
            forged, covered = False, len(a.entries)  # not a forgery of anything the quote covers
        resp = await a.send_evidence(body)
        assert resp.status_code < 500, (what, resp.status_code, resp.text[:300])
        if resp.status_code != 202:
            assert forged and 400 <= resp.status_code < 500, (what, resp.status_code, resp.text[:300])
            outcome = f"refused {resp.status_code}"
        else:
            evaluation = (await verdict(rv, A, index))["attributes"]["evaluation"]
            assert evaluation == ("fail" if forged else "pass"), (n, what, evaluation)
            outcome = evaluation
        seen[outcome] = seen.get(outcome, 0) + 1
        kinds.add(" ".join(what.split()[:2]))
        if outcome != "pass":  # failed (or a refused agent): the tenant reactivates it
            await rv.call("PUT", f"/agents/{A}/reactivate")
        # past quote_interval (2 s), so the next cycle is not premature: the clock moved at once
        # (autojump would stop at each of the verifier's deadlines on the way, 0.3 s of real time each)
        clock.jump(3)
        await trio.sleep(0)
    # the walk did what it says: every clean cycle passed, forgeries failed after a 202
    assert seen.get("pass", 0) >= CYCLES // 4 and seen.get("fail", 0) >= CYCLES // 2, seen
    assert kinds == {"as built", "message", "signature", "pcr value", "ima char", "ima extra"}, kinds
