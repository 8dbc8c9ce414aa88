"""Benchmark worker for keytrio (keytrio's .venv python): ``python -m bench.worker_keytrio``.

Commands (see bench.wire): ``load`` {dir}, ``evidence`` {case, reps, tamper}, ``poll_setup``,
``poll`` {start, count}. Timed scopes:

- evidence: :func:`protocol.evidence.verify` with a fresh
  :class:`protocol.ima_eval.ImaChecker` (progress zero), the AK as raw TPM2B_PUBLIC bytes (parsed
  in the call), PCR 16 checked against the NK, the policy parsed beforehand (once per upload in
  keytrio, as upstream's deserialised dict is on its side);
- poll: ``json.loads`` of the agent's response body + :func:`actors.verifier.attest.evaluate` (the
  monitor's per-poll check: reply types, quote, PCR 16, tpm_policy, the AgentIma hook resolving
  the policy and replaying only the new lines).
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from bench import wire
from keytrio.actors.verifier.attest import AgentTarget, AttestState, evaluate
from keytrio.actors.verifier.ima import AgentIma, FixedPolicy
from keytrio.protocol import tpm2
from keytrio.protocol.evidence import Evidence, Expectations, verify
from keytrio.protocol.ima_eval import ImaChecker
from keytrio.protocol.runtime_policy import load_policy
from keytrio.protocol.wire import ImaTail, IntegrityQuote

S: dict[str, Any] = {}


def _load(cmd: dict[str, Any]) -> dict[str, Any]:
    d = Path(cmd["dir"])
    inp = json.loads((d / "inputs.json").read_text())
    S["inp"] = inp
    S["lines"] = (d / "ima.txt").read_text().splitlines(keepends=True)
    S["policy"] = load_policy((d / "policy.json").read_bytes())
    S["ak"] = base64.b64decode(inp["ak_b64"])
    return {"ok": True}



def _evidence(cmd: dict[str, Any]) -> dict[str, Any]:
    inp = S["inp"]
    case, text, nonce = wire.evidence_case(inp, S["lines"], cmd)

    def call() -> bool:
        expect = Expectations(
            ak=S["ak"], nonce=nonce, tpm_policy=inp["tpm_policy"], nk_pem=inp["nk_pem"],
            ima=ImaChecker(S["policy"]), accepted_hash_algs=("sha512", "sha384", "sha256"),
            accepted_sign_algs=("ecschnorr", "rsassa"),
        )  # fmt: skip
        return verify(expect, Evidence(case["quote"], inp["bank"], ima_list=text)).valid

    acc = wire.Samples()
    for _ in range(cmd.get("reps", 1)):
        acc.add(call)
    return acc.reply(lines=case["lines"])


def _poll_setup(cmd: dict[str, Any]) -> dict[str, Any]:
    inp = S["inp"]
    st = inp["steady"]
    target = AgentTarget(
        "bench-agent", "127.0.0.1", 9002, "", tpm2.ak_key(S["ak"]), tpm_policy=inp["tpm_policy"],
        ima_check=AgentIma("bench-agent", FixedPolicy(S["policy"]), "bench-policy", None),
    )  # fmt: skip
    state = AttestState()
    first = IntegrityQuote(
        st["quote"], inp["bank"], "rsa", "rsassa", pubkey=inp["nk_pem"], boottime=inp["boottime"],
        ima=ImaTail(wire.list_text(S["lines"], st["lines"]), 0),
    )  # fmt: skip
    fails = evaluate(target, state, first.encode(), st["nonce"])
    S["target"], S["state"] = target, state
    return {"valid": not fails, "failures": [f.event_id for f in fails], "next_entry": state.ima_ml_entry}


def _poll(cmd: dict[str, Any]) -> dict[str, Any]:
    target, state, polls = S["target"], S["state"], S["inp"]["polls"]
    acc = wire.Samples()
    for p in polls[cmd["start"]:cmd["start"] + cmd["count"]]:
        body, nonce = p["body"], p["nonce"]

        def call(body: str = body, nonce: str = nonce) -> bool:
            reply = json.loads(body)["results"]
            return not evaluate(target, state, reply, nonce)

        acc.add(call)
    return acc.reply(next_entry=state.ima_ml_entry)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.disable(logging.INFO)  # both sides at WARNING: no per-call INFO formatting
    wire.serve({"load": _load, "evidence": _evidence, "poll_setup": _poll_setup, "poll": _poll})


if __name__ == "__main__":
    main()
