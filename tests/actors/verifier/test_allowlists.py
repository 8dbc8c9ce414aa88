"""Runtime-policy endpoints, signatures, enrolment by name/inline (a real Verifier over mTLS, no
TPM needed), and the verifier's IMA hook on ima-sig / ima-buf entries (unit level)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from keytrio.actors.verifier.ima import AgentIma, FixedPolicy
from keytrio.protocol import dsse, ima
from keytrio.protocol.ima_rules import NOT_IN_ALLOWLIST
from keytrio.protocol.ima_sig import ima_signature
from keytrio.protocol.runtime_policy import keyidv2, parse_policy
from tests.actors.registrar_support import SoftTpm
from tests.actors.verifier_support import (
    RunningVerifier,
    doc_b64,
    policy_doc,
    soft_enrol_body,
    start_verifier,
)

GOOD = policy_doc({"/usr/bin/a": b"a"}, excludes=("/tmp/.*",))
A = "d432fbb3-d2f1-4a97-9ef7-75bd81c0a000"
B = "d432fbb3-d2f1-4a97-9ef7-75bd81c0a001"


def body(doc: Any = GOOD, **extra: Any) -> dict[str, Any]:
    raw = doc if isinstance(doc, str) else doc_b64(doc)
    return {"runtime_policy": raw, "runtime_policy_key": "", "tpm_policy": json.dumps({"mask": "0x400"}), **extra}


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signed(doc: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    env = dsse.sign_envelope(json.dumps(doc).encode(), dsse.KEYLIME_PAYLOAD_TYPE, key)
    return base64.b64encode(env.encode()).decode()


async def run(nursery: trio.Nursery, tmp: Path, pki: Any, **opts: Any) -> RunningVerifier:
    return await start_verifier(nursery, pki, tmp / "verifier", **opts)


async def test_crud_and_bad_input_table(nursery: trio.Nursery, tmp_path: Path, pki: Any) -> None:
    rv = await run(nursery, tmp_path, pki)
    assert (await rv.call("GET", "/allowlists/"))["results"] == {"runtimepolicy names": []}
    # upstream's shapes: 201 "Created" for POST and PUT, the record {name, tmp_policy (sic, null),
    # runtime_policy as uploaded (JSON text)}, DELETE 204 without a body
    created = await rv.call("POST", "/allowlists/p1", body(), code=201)
    assert created == {"code": 201, "status": "Created", "results": {}}
    r = await rv.call("POST", "/allowlists/p1", body(), code=409)
    assert r["status"] == "Runtime policy with name p1 already exists"
    res = (await rv.call("GET", "/allowlists/p1"))["results"]
    assert res == {"name": "p1", "tmp_policy": None, "runtime_policy": json.dumps(GOOD)}
    assert rv.verifier.policies is not None
    stored = await rv.verifier.policies.get_named("p1")  # the tpm_policy is kept (upstream shows none)
    assert stored is not None and json.loads(stored[0].tpm_policy or "") == {"mask": "0x400"}
    await rv.call("PUT", "/allowlists/p1", body(policy_doc({"/usr/bin/b": b"b"})), code=201)
    res = (await rv.call("GET", "/allowlists/p1"))["results"]
    assert "/usr/bin/b" in json.loads(res["runtime_policy"])["digests"]
    await rv.call("PUT", "/allowlists/nope", body(), code=404)
    await rv.call("GET", "/allowlists/nope", code=404)
    await rv.call("DELETE", "/allowlists/nope", code=404)
    assert (await rv.call("GET", "/allowlists/"))["results"]["runtimepolicy names"] == ["p1"]

    bad_digest = {**GOOD, "digests": {"/usr/bin/a": ["zz"]}}
    table: dict[str, tuple[dict[str, Any], str]] = {
        "not_b64": (body("@@@"), "runtime_policy"),
        "not_json": (body(base64.b64encode(b"{nope").decode()), "runtime_policy"),
        "empty": (body(""), "runtime_policy"),
        "digest_hex": (body(bad_digest), 'runtime_policy.digests["/usr/bin/a"][0]'),
        "digest_size": (body({**GOOD, "digests": {"/x": ["ab" * 7]}}), 'runtime_policy.digests["/x"][0]'),
        "regex": (body({**GOOD, "excludes": ["("]}), "runtime_policy.excludes[0]"),
        "version": (body({**GOOD, "meta": {"version": 2}}), "runtime_policy.meta.version"),
        "dm_policy": (body({**GOOD, "ima": {**GOOD["ima"], "dm_policy": {}}}), "runtime_policy.ima.dm_policy"),
        "log_hash_alg": (body({**GOOD, "ima": {**GOOD["ima"], "log_hash_alg": "md5"}}),
                         "runtime_policy.ima.log_hash_alg"),
        "no_ima_section": (body({k: v for k, v in GOOD.items() if k != "ima"}), "runtime_policy"),
        "ima_section_partial": (body({**GOOD, "ima": {"dm_policy": None}}), "runtime_policy.ima"),
        "key_not_pem": (body(runtime_policy_key="%%%"), "runtime_policy_key"),
    }
    for name, (doc, field) in table.items():
        r = await rv.admin.post(f"{rv.url}/allowlists/bad", json=doc)
        assert r.status_code == 400, (name, r.text)
        env = r.json()
        assert field in env["status"], (name, env)
        if env["results"]:
            assert env["results"]["field"] == field, (name, env)
    for name, doc in {"sig": body(runtime_policy_sig="AAAA"), "tpm_policy": body(tpm_policy="[1]")}.items():
        r = await rv.admin.post(f"{rv.url}/allowlists/bad", json=doc)
        assert r.status_code == 400, (name, r.text)
    r = await rv.admin.post(f"{rv.url}/allowlists/bad%20name", json=body())
    assert r.status_code == 400
    resp = await rv.admin.delete(f"{rv.url}/allowlists/p1")
    assert (resp.status_code, resp.content, resp.headers["content-type"]) == (204, b"", "application/json")
    assert (await rv.call("GET", "/allowlists/"))["results"]["runtimepolicy names"] == []
    await rv.stop()


async def test_signed_policies(nursery: trio.Nursery, tmp_path: Path, pki: Any) -> None:
    rv = await run(nursery, tmp_path, pki, require_allow_list_signatures=True)
    key, wrong = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    env = signed(GOOD, key)
    await rv.call("POST", "/allowlists/s1", body(env, runtime_policy_key=pem(key)), code=201)
    # upstream's tenant sends the key base64-encoded
    await rv.call("POST", "/allowlists/s2", body(env, runtime_policy_key=base64.b64encode(pem(key).encode()).decode()),
                  code=201)
    for name, doc in {
        "wrong_key": body(env, runtime_policy_key=pem(wrong)),
        "unsigned_with_key": body(GOOD, runtime_policy_key=pem(key)),
        "unsigned_required": body(GOOD),
        "signed_without_key": body(env),
        "tampered": body(signed({**GOOD, "digests": {}}, wrong), runtime_policy_key=pem(key)),
    }.items():
        r = await rv.admin.post(f"{rv.url}/allowlists/bad", json=doc)
        assert r.status_code == 400, (name, r.text)
    assert (await rv.call("GET", "/allowlists/"))["results"]["runtimepolicy names"] == ["s1", "s2"]
    assert rv.verifier.policies is not None
    # both names share one stored, parsed copy
    assert rv.verifier.policies.by_name("s1") is rv.verifier.policies.by_name("s2")
    await rv.stop()


async def test_enrolment_by_name_inline_and_in_use(nursery: trio.Nursery, tmp_path: Path, pki: Any) -> None:
    soft = SoftTpm.new()
    data = tmp_path / "verifier"
    rv = await run(nursery, tmp_path, pki, quote_interval=60.0, max_retries=0)
    await rv.call("POST", "/allowlists/named", body(), code=201)
    await rv.call("POST", f"/agents/{A}", soft_enrol_body(soft, pki, runtime_policy_name="unknown"), code=404)
    await rv.call("POST", f"/agents/{A}", soft_enrol_body(soft, pki, runtime_policy=doc_b64({"meta": {}})), code=400)
    await rv.call("POST", f"/agents/{A}", soft_enrol_body(soft, pki, runtime_policy_name="named"))
    # inline under an existing name with other content: 409; with a new name: stored under it
    other = doc_b64(policy_doc({"/usr/bin/z": b"z"}))
    await rv.call("POST", f"/agents/{B}", soft_enrol_body(soft, pki, runtime_policy=other, runtime_policy_name="named"),
                  code=409)
    await rv.call("POST", f"/agents/{B}", soft_enrol_body(soft, pki, runtime_policy=other, runtime_policy_name="fresh"))
    for aid in (A, B):
        assert (await rv.get(aid))["has_runtime_policy"] == 1  # type: ignore[index]
    assert (await rv.call("GET", "/allowlists/"))["results"]["runtimepolicy names"] == ["fresh", "named"]
    r = await rv.call("DELETE", "/allowlists/named", code=409)
    assert r["status"] == f"Can't delete allowlist as it's currently in use by agent {A}" and r["results"] == {}
    await rv.call("DELETE", f"/agents/{A}")
    await rv.call("DELETE", "/allowlists/named", code=204)
    await rv.stop()
    # restart: stored policies are parsed again, names resolve
    rv = await start_verifier(nursery, pki, data, quote_interval=60.0)
    assert rv.verifier.policies is not None and rv.verifier.policies.by_name("fresh") is not None
    assert rv.metric("runtime_policy_parses_total") == 1
    await rv.stop()


# --- ima-sig / ima-buf through the verifier's hook (unit level) -----------------------------------


def _run_hook(entries: list[ima.Entry], doc: dict[str, Any], extra: list[Any] = ()) -> list[str]:
    policy = parse_policy(json.dumps(doc))
    hook = AgentIma("unit", FixedPolicy(policy), None, policy.checksum, extra_keys=extra)
    text = "".join(ima.format_line(e) + "\n" for e in entries)
    fails, count = hook(text, 0, {10: ima.replay(entries, "sha256")}, "sha256")
    return [f"{f.event_id}:{f.context.get('path')}" for f in fails] or [f"ok:{count}"]


def _sig(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    raw = key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return ima_signature(digest, "sha256", keyidv2(key.public_key()), raw)


def test_ima_sig_and_ima_buf_keyrings() -> None:
    key, other = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    d = hashlib.sha256(b"signed file").digest()
    doc = policy_doc({})
    doc["verification-keys"] = json.dumps({"pubkeys": [base64.b64encode(der).decode()]})

    def sig_entry(signature: bytes | None) -> ima.Entry:
        return ima.build_entry("ima-sig", "/usr/bin/signed", "sha256", d, signature=signature)

    assert _run_hook([sig_entry(_sig(key, d))], doc) == ["ok:1"]
    assert _run_hook([sig_entry(_sig(other, d))], doc) == [f"{NOT_IN_ALLOWLIST}:/usr/bin/signed"]
    assert _run_hook([sig_entry(None)], doc) == [f"{NOT_IN_ALLOWLIST}:/usr/bin/signed"]

    # ima-buf: a key loaded on the .ima keyring; allowed -> learned, then used for ima-sig
    buf = ima.build_entry("ima-buf", ".ima", "sha256", hashlib.sha256(der).digest(), buf=der)
    allowed = {**policy_doc({}), "keyrings": {".ima": [hashlib.sha256(der).hexdigest()]}}
    assert _run_hook([buf, sig_entry(_sig(key, d))], allowed) == ["ok:2"]
    denied = {**policy_doc({}), "keyrings": {".ima": ["00" * 32]}}
    assert _run_hook([buf], denied)[0].startswith("ima.validation.ima-ng.runtime_policy_hash:.ima")
    assert _run_hook([buf], policy_doc({})) == [f"{NOT_IN_ALLOWLIST}:.ima"]
    # the agent's ima_sign_verification_keys also verify signatures
    from keytrio.actors.verifier.ima import parse_verification_keys

    keys = parse_verification_keys(json.dumps([base64.b64encode(der).decode()]))
    assert _run_hook([sig_entry(_sig(key, d))], policy_doc({}), keys) == ["ok:1"]
