"""Bad input for every agent endpoint: a clear envelope error, no state change, still serving."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keytrio.protocol import payload as pl
from tests.actors.agent_support import NONCE, Running, results

pytestmark = pytest.mark.swtpm

V = "/v2.1"


def _oaep(pem: str, data: bytes) -> str:
    key = serialization.load_pem_public_key(pem.encode())
    pad = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return base64.b64encode(key.encrypt(data, pad)).decode()  # type: ignore[union-attr]


def _u(nk: str, **change: Any) -> dict[str, Any]:
    h = pl.new_key_halves(os.urandom(64))
    body: dict[str, Any] = {"encrypted_key": pl.encrypt_key_half(nk, h.u), "auth_tag": pl.auth_tag(h.k, "x")}
    body.update(change)
    return {k: v for k, v in body.items() if v is not ...}


# (id, method, path, query params, body maker(nk) -> JSON value | bytes | None, content type, status)
Body = Callable[[str], Any]
CASES: list[tuple[str, str, str, dict[str, str] | None, Body | None, str | None, int]] = [
    # routing / versions
    ("pubkey-post", "POST", "/keys/pubkey", None, lambda nk: {}, None, 405),
    ("unsupported-version", "GET", "/v9.9/keys/pubkey", None, None, None, 400),
    ("old-version", "GET", "/v2.0/quotes/identity", {"nonce": NONCE}, None, None, 400),
    # identity quote
    ("identity-no-nonce", "GET", "/quotes/identity", None, None, None, 400),
    ("identity-nonce-long", "GET", "/quotes/identity", {"nonce": "a" * 65}, None, None, 400),
    ("identity-nonce-chars", "GET", "/quotes/identity", {"nonce": "abc-def"}, None, None, 400),
    ("identity-nonce-empty", "GET", "/quotes/identity", {"nonce": ""}, None, None, 400),
    # integrity quote
    ("integrity-no-nonce", "GET", "/quotes/integrity", {"mask": "0x400"}, None, None, 400),
    ("integrity-mask-hex", "GET", "/quotes/integrity", {"nonce": NONCE, "mask": "0xZZ"}, None, None, 400),
    ("integrity-mask-pcr24", "GET", "/quotes/integrity", {"nonce": NONCE, "mask": "0x1000000"}, None, None, 400),
    ("integrity-mask-no-0x", "GET", "/quotes/integrity", {"nonce": NONCE, "mask": "400"}, None, None, 400),
    ("integrity-partial", "GET", "/quotes/integrity", {"nonce": NONCE, "mask": "0x1", "partial": "2"}, None, None, 400),
    ("integrity-entry-neg", "GET", "/quotes/integrity", {"nonce": NONCE, "mask": "0x1", "ima_ml_entry": "-1"},
     None, None, 400),
    ("integrity-entry-text", "GET", "/quotes/integrity", {"nonce": NONCE, "mask": "0x1", "ima_ml_entry": "x"},
     None, None, 400),
    # ukey
    ("ukey-malformed-json", "POST", "/keys/ukey", None, lambda nk: b"{not json", None, 400),
    ("ukey-json-array", "POST", "/keys/ukey", None, lambda nk: [1, 2], None, 400),
    ("ukey-content-type", "POST", "/keys/ukey", None, lambda nk: b"<xml/>", "application/xml", 400),
    ("ukey-missing-key", "POST", "/keys/ukey", None, lambda nk: _u(nk, encrypted_key=...), None, 400),
    ("ukey-key-not-b64", "POST", "/keys/ukey", None, lambda nk: _u(nk, encrypted_key="***"), None, 400),
    ("ukey-key-int", "POST", "/keys/ukey", None, lambda nk: _u(nk, encrypted_key=5), None, 400),
    ("ukey-key-junk", "POST", "/keys/ukey", None,
     lambda nk: _u(nk, encrypted_key=base64.b64encode(b"x" * 256).decode()), None, 400),
    ("ukey-key-16-bytes", "POST", "/keys/ukey", None, lambda nk: _u(nk, encrypted_key=_oaep(nk, b"k" * 16)),
     None, 400),
    ("ukey-missing-tag", "POST", "/keys/ukey", None, lambda nk: _u(nk, auth_tag=...), None, 400),
    ("ukey-tag-not-hex", "POST", "/keys/ukey", None, lambda nk: _u(nk, auth_tag="zz" * 48), None, 400),
    ("ukey-tag-short", "POST", "/keys/ukey", None, lambda nk: _u(nk, auth_tag="ab" * 10), None, 400),
    ("ukey-tag-list", "POST", "/keys/ukey", None, lambda nk: _u(nk, auth_tag=["ab"]), None, 400),
    ("ukey-payload-not-b64", "POST", "/keys/ukey", None, lambda nk: _u(nk, payload="%%%"), None, 400),
    ("ukey-payload-short", "POST", "/keys/ukey", None, lambda nk: _u(nk, payload="AAAA"), None, 400),
    ("ukey-oversized", "POST", "/keys/ukey", None, lambda nk: _u(nk, payload="A" * (2 << 20)), None, 413),
    # vkey
    ("vkey-missing-key", "POST", "/keys/vkey", None, lambda nk: {}, None, 400),
    ("vkey-key-not-b64", "POST", "/keys/vkey", None, lambda nk: {"encrypted_key": "not base64!"}, None, 400),
    ("vkey-key-16-bytes", "POST", "/keys/vkey", None, lambda nk: {"encrypted_key": _oaep(nk, b"v" * 16)},
     None, 400),
    ("vkey-malformed-json", "POST", "/keys/vkey", None, lambda nk: b'{"encrypted_key": ', None, 400),
    ("vkey-get", "GET", "/keys/vkey", None, None, None, 405),
    # verify
    ("verify-no-challenge", "GET", "/keys/verify", None, None, None, 400),
    ("verify-bad-challenge", "GET", "/keys/verify", {"challenge": "a b"}, None, None, 400),
    ("verify-before-k", "GET", "/keys/verify", {"challenge": "abc123"}, None, None, 400),
    # revocation
    ("revocation-malformed-json", "POST", "/notifications/revocation", None, lambda nk: b"[", None, 400),
    ("revocation-missing-msg", "POST", "/notifications/revocation", None, lambda nk: {"signature": ""}, None, 400),
    ("revocation-msg-int", "POST", "/notifications/revocation", None, lambda nk: {"msg": 1, "signature": ""},
     None, 400),
    ("revocation-no-signature", "POST", "/notifications/revocation", None,
     lambda nk: {"msg": json.dumps({"type": "revocation"})}, None, 400),
    ("revocation-msg-not-json", "POST", "/notifications/revocation", None,
     lambda nk: {"msg": "{oops", "signature": ""}, None, 400),
    ("revocation-wrong-type", "POST", "/notifications/revocation", None,
     lambda nk: {"msg": json.dumps({"type": "other"}), "signature": ""}, None, 400),
]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


GROUPS = sorted({c[0].split("-")[0] for c in CASES})


async def _send(r: Running, case: tuple[Any, ...]) -> None:
    name, method, path, params, body, ctype, status = case
    url = (r.root if path.startswith(("/v9", "/v2.0")) else r.base) + path
    kwargs: dict[str, Any] = {"params": params}
    if body is not None:
        value = body(r.info.nk_pem)
        if isinstance(value, bytes):
            kwargs["content"] = value
            kwargs["headers"] = {"content-type": ctype or "application/json"}
        else:
            kwargs["json"] = value
    resp = await r.client.request(method, url, **kwargs)
    assert resp.status_code == status, (name, resp.text)
    doc = resp.json()
    assert doc["code"] == status and isinstance(doc["status"], str) and doc["status"], name
    assert isinstance(doc["results"], dict), name
    assert "Traceback" not in resp.text, name


# One agent per endpoint group (starting an agent per case would triple the runtime); each case is
# followed by the no-state-change checks, and the group ends with a full key delivery and a quote.
@pytest.mark.parametrize("group", GROUPS)
async def test_bad_input(running: Running, group: str) -> None:
    r = running
    nk = r.info.nk_pem
    before = _files(r.data_dir)
    cases = [c for c in CASES if c[0].split("-")[0] == group]
    assert cases
    for case in cases:
        await _send(r, case)
        # nothing changed: files, no K, no scripts
        assert _files(r.data_dir) == before, case[0]
        assert (await r.get("/keys/verify", challenge="abc")).status_code == 400, case[0]
        assert r.agent.runner is not None and r.agent.runner.completed == 0, case[0]

    # the agent still works end to end, and no bad request left a usable half behind
    h = pl.new_key_halves(os.urandom(64))
    results(await r.post("/keys/vkey", {"encrypted_key": pl.encrypt_key_half(nk, h.v)}))
    results(await r.post("/keys/ukey", {"encrypted_key": pl.encrypt_key_half(nk, h.u),
                                        "auth_tag": pl.auth_tag(h.k, r.info.agent_id)}))
    assert results(await r.get("/keys/verify", challenge="abc"))["hmac"] == pl.verify_hmac(h.k, "abc")
    results(await r.get("/quotes/identity", nonce=NONCE))
