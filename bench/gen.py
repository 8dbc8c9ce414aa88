"""Make the benchmark inputs once, with a real swtpm (run with keytrio's interpreter).

One swtpm, one RSA-2048 AK (RSASSA/SHA-256), PCR 16 bound to an NK public key, and one ima-ng
measurement list whose every line is extended into PCR 10 (sha256 bank) for real. Quotes over
PCRs 0-7, 10, 16 are taken at each checkpoint (``sizes`` lines), then for ``polls`` steady-state
polls of ``lines_per_poll`` new lines each (after the 10,000-line checkpoint, or the largest one
below it). The runtime policy lists every file of the list. Everything goes to ``out/inputs.json``
(+ ``policy.json`` and ``ima.txt``), which both workers read: same bytes on both sides.

    python -m bench.gen OUT_DIR --sizes 0,1000,10000 --polls 40
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import string
import tempfile
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keytrio.actors.agent.tpm import AttestationKey, Tpm
from keytrio.protocol import ima, tpm2
from keytrio.protocol.quote import build_quote, encode_pcr_blob
from keytrio.protocol.wire import BootLog, ImaTail, IntegrityQuote
from keytrio.testbed.swtpm import swtpm_running

BANK = "sha256"
QUOTED_PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 10, 16]
MASK = hex(sum(1 << p for p in QUOTED_PCRS))
BOOTTIME = 1_700_000_000
STEADY_BASE = 10_000  # the steady-state poll starts from a log of this many verified lines
_ALNUM = string.ascii_letters + string.digits


def nonce() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(20))


def entry_for(i: int) -> ima.Entry:
    """Line ``i``: a distinct file with a distinct sha256 content digest (template hash sha1)."""
    content = f"file {i}".encode()
    return ima.build_entry("ima-ng", f"/usr/lib/bench/d{i // 1000}/f{i}", "sha256", hashlib.sha256(content).digest())


def policy_doc(entries: list[ima.Entry]) -> dict[str, Any]:
    """A runtime policy (upstream's JSON format) listing every file of ``entries``."""
    return {
        "meta": {"version": 1, "generator": 3},
        "release": 0,
        "digests": {e.path: [e.digest.hex()] for e in entries},
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


async def _quote(tpm: Tpm, ak: AttestationKey) -> tuple[str, str]:
    n = nonce()
    q = await tpm.quote(ak, nonce=n.encode(), pcrs=QUOTED_PCRS, bank=BANK)
    return n, build_quote(q.attest, q.signature, encode_pcr_blob(BANK, q.pcrs))


async def generate(out: Path, sizes: list[int], polls: int, lines_per_poll: int,
                   extra_sizes: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """``extra_sizes``: more checkpoints (cases flagged ``"extra": True``) that do not move the
    steady-state base: the evidence endpoint's body sizes (bench.http_load)."""
    out.mkdir(parents=True, exist_ok=True)
    base = max([s for s in sizes if s <= STEADY_BASE], default=0)
    extra = set(extra_sizes) - set(sizes)
    sizes = sorted(set(sizes) | extra)
    total = max(sizes[-1], base + polls * lines_per_poll)
    entries = [entry_for(i) for i in range(total)]
    lines = [ima.format_line(e) for e in entries]
    nk = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    nk_pem = nk.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    cases: list[dict[str, Any]] = []
    poll_list: list[dict[str, Any]] = []
    steady: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-swtpm-") as tmp:
        async with swtpm_running(Path(tmp) / "state") as sw:
            tpm = await Tpm.open(sw.tcti)
            try:
                ek = await tpm.endorsement_key()
                ak = await tpm.create_ak(ek, alg="rsa", hash_alg=BANK)
                await tpm.extend(16, {BANK: tpm2.digest(BANK, nk_pem.encode())})
                done = 0

                async def extend_to(n: int) -> None:
                    nonlocal done
                    if n < done:
                        raise ValueError(f"checkpoint {n} falls inside the steady-state polls (at {done})")
                    for e in entries[done:n]:
                        await tpm.extend(ima.IMA_PCR, {BANK: ima.extend_digest(e, BANK)})
                    done = n

                plan = sorted(set(sizes) | {base})
                for size in plan:
                    await extend_to(size)
                    n, q = await _quote(tpm, ak)
                    if size in sizes:
                        cases.append({"lines": size, "nonce": n, "quote": q, "extra": size in extra})
                    if size != base:
                        continue
                    steady = {"lines": size, "nonce": n, "quote": q}
                    # the steady-state polls go right after the base checkpoint
                    for k in range(polls):
                        first = base + k * lines_per_poll
                        await extend_to(first + lines_per_poll)
                        n, q = await _quote(tpm, ak)
                        results = IntegrityQuote(
                            q, BANK, "rsa", "rsassa", boottime=BOOTTIME, mb=BootLog(None),
                            ima=ImaTail("".join(x + "\n" for x in lines[first:first + lines_per_poll]), first),
                        ).encode()  # fmt: skip
                        body = json.dumps({"code": 200, "status": "Success", "results": results})
                        poll_list.append({"nonce": n, "body": body})
                pcr16 = (await tpm.read_pcrs(BANK, [16]))[16]
                ak_public, ek_public = ak.public, ek.public
            finally:
                await tpm.close()
    if pcr16 != tpm2.pcr16_binding_value(BANK, nk_pem):
        raise RuntimeError("PCR 16 does not hold the NK binding (swtpm state not fresh?)")

    (out / "ima.txt").write_text("".join(x + "\n" for x in lines))
    policy_lines = max(sizes[-1], base + polls * lines_per_poll)
    (out / "policy.json").write_text(json.dumps(policy_doc(entries[:policy_lines])))
    # tampered control: the first checkpoint >= 1 line with one file digest changed in the middle
    tampered = None
    for c in cases:
        if c["lines"] > 0 and not c["extra"]:
            k = c["lines"] // 2
            e = entries[k]
            forged = ima.format_line(e).replace(e.digest.hex(), hashlib.sha256(b"evil").hexdigest())
            tampered = {"lines": c["lines"], "nonce": c["nonce"], "quote": c["quote"], "line": k, "text": forged}
            break
    inputs = {
        "bank": BANK, "mask": MASK, "tpm_policy": {"mask": MASK}, "boottime": BOOTTIME,
        "ak_b64": base64.b64encode(ak_public).decode(), "ek_b64": base64.b64encode(ek_public).decode(), "nk_pem": nk_pem,
        "cases": cases, "steady": steady, "polls": poll_list, "lines_per_poll": lines_per_poll,
        "policy_files": policy_lines, "tampered": tampered,
    }  # fmt: skip
    (out / "inputs.json").write_text(json.dumps(inputs))
    return inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--sizes", default="0,1000,10000")
    ap.add_argument("--polls", type=int, default=40)
    ap.add_argument("--lines-per-poll", type=int, default=3)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    trio.run(generate, a.out, sizes, a.polls, a.lines_per_poll)


if __name__ == "__main__":
    main()
