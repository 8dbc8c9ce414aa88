"""Benchmark worker for upstream Keylime 7.14.3 (run with the upstream venv's python).

    PYTHONPATH=<repo> <KL_VENV>/bin/python -m bench.worker_upstream

Imports only the stdlib, ``bench.wire`` and ``keylime``. Same commands as bench.worker_keytrio.
Timed scopes:

- evidence: ``keylime.tpm.tpm_main.Tpm().check_quote`` with a fresh ``AgentAttestState`` (its IMA
  keyrings set up as ``process_quote_response`` does), the NK PEM as ``data`` (PCR 16 check), the
  runtime policy already deserialised (a dict);
- poll: what upstream's ``invoke_get_quote`` does with a 200 response: ``json.loads`` of the body,
  ``ima.deserialize_runtime_policy`` of the stored policy text, then
  ``cloud_verifier_common.process_quote_response`` (record keeping, algorithms, IMA entry number,
  check_quote over the new lines). Its database writes are not included.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

from bench import wire

S: dict[str, Any] = {}


def _load(cmd: dict[str, Any]) -> dict[str, Any]:
    from keylime.mba import mba
    from keylime.tpm.tpm_main import Tpm

    mba.load_imports(skip_custom_policies=True)  # as keylime_verifier does at start (bootlog_parse needs it)
    d = Path(cmd["dir"])
    inp = json.loads((d / "inputs.json").read_text())
    S["inp"] = inp
    S["lines"] = (d / "ima.txt").read_text().splitlines(keepends=True)
    S["policy_text"] = (d / "policy.json").read_text()
    S["policy"] = json.loads(S["policy_text"])
    S["tpm"] = Tpm()
    import keylime

    return {"ok": True, "keylime": getattr(keylime, "__version__", None) or _dist_version()}


def _dist_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("keylime")
    except Exception:
        return None



def _evidence(cmd: dict[str, Any]) -> dict[str, Any]:
    from keylime.agentstates import AgentAttestState
    from keylime.common.algorithms import Hash
    from keylime.ima.file_signatures import ImaKeyring

    inp = S["inp"]
    case, text, nonce = wire.evidence_case(inp, S["lines"], cmd)
    tpm_policy = json.dumps(inp["tpm_policy"])
    policy = S["policy"]

    def call() -> bool:
        state = AgentAttestState("bench-agent")
        keyrings = state.get_ima_keyrings()
        keyrings.set_tenant_keyring(ImaKeyring.from_string(policy["verification-keys"]))
        failure = S["tpm"].check_quote(
            state, nonce, inp["nk_pem"], case["quote"], inp["ak_b64"], tpm_policy, text, policy,
            Hash.SHA256, keyrings,
        )  # fmt: skip
        return not failure

    acc = wire.Samples()
    for _ in range(cmd.get("reps", 1)):
        acc.add(call)
    return acc.reply(lines=case["lines"])


def _agent_record() -> dict[str, Any]:
    inp = S["inp"]
    return {
        "agent_id": "bench-agent", "nonce": "", "public_key": "", "ak_tpm": inp["ak_b64"],
        "tpm_policy": json.dumps(inp["tpm_policy"]), "accept_tpm_hash_algs": ["sha512", "sha384", "sha256"],
        "accept_tpm_encryption_algs": ["ecc", "rsa"], "accept_tpm_signing_algs": ["ecschnorr", "rsassa"],
        "supported_version": "2.1", "attestation_count": 0, "ima_sign_verification_keys": "",
        "tpm_clockinfo": None, "v": None, "b64_encrypted_V": "", "ip": "127.0.0.1", "port": 9002,
    }  # fmt: skip


def _poll_setup(cmd: dict[str, Any]) -> dict[str, Any]:
    from keylime import cloud_verifier_common
    from keylime.agentstates import AgentAttestState
    from keylime.ima import ima

    inp = S["inp"]
    st = inp["steady"]
    agent = _agent_record()
    agent["nonce"] = st["nonce"]
    state = AgentAttestState("bench-agent")
    results = {
        "quote": st["quote"], "hash_alg": inp["bank"], "enc_alg": "rsa", "sign_alg": "rsassa",
        "pubkey": inp["nk_pem"], "ima_measurement_list": wire.list_text(S["lines"], st["lines"]),
        "ima_measurement_list_entry": 0, "mb_measurement_list": None, "boottime": inp["boottime"],
    }  # fmt: skip
    failure = cloud_verifier_common.process_quote_response(
        agent, None, ima.deserialize_runtime_policy(S["policy_text"]), results, state)
    # after PROVIDE_V upstream holds the encrypted V: partial=1 polls reuse the cached NK
    agent["b64_encrypted_V"] = base64.b64encode(b"v" * 32).decode()
    S["agent"], S["state"] = agent, state
    return {"valid": not failure, "failures": [e.event_id for e in failure.events],
            "next_entry": state.get_next_ima_ml_entry()}


def _poll(cmd: dict[str, Any]) -> dict[str, Any]:
    from keylime import cloud_verifier_common
    from keylime.ima import ima

    agent, state, polls = S["agent"], S["state"], S["inp"]["polls"]
    policy_text = S["policy_text"]
    acc = wire.Samples()
    for p in polls[cmd["start"]:cmd["start"] + cmd["count"]]:
        agent["nonce"] = p["nonce"]  # prepare_get_quote's job, before the request
        body = p["body"]

        def call(body: str = body) -> bool:
            json_response = json.loads(body)
            failure = cloud_verifier_common.process_quote_response(
                agent, None, ima.deserialize_runtime_policy(policy_text), json_response["results"], state)
            return not failure

        acc.add(call)
    return acc.reply(next_entry=state.get_next_ima_ml_entry())


def main() -> None:
    os.environ.setdefault("KEYLIME_LOGGING_CONFIG", "/nonexistent")
    logging.basicConfig(level=logging.WARNING)
    logging.disable(logging.INFO)  # both sides at WARNING: upstream's per-call INFO lines are not formatted
    wire.serve({"load": _load, "evidence": _evidence, "poll_setup": _poll_setup, "poll": _poll})


if __name__ == "__main__":
    main()
