"""``POST /verify/evidence`` through the fast route (common.app.FastRoutes) answers exactly what the
quart route answers; the evidence check's caches (parsed policy, AK) and its inline / worker-thread
split never change a verdict. Real agent quote (swtpm), real verifier over mTLS sockets."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier import evidence, routes_verify
from keytrio.protocol.ima_rules import NOT_IN_ALLOWLIST
from keytrio.testbed.ima_log import ImaLog
from tests.actors.verifier_support import BANKS, BASE, policy_doc, start_test_agent, start_verifier

pytestmark = pytest.mark.swtpm

NONCE = "abcdefghij0123456789"


async def test_fast_route_matches_quart_route_and_caches_keep_verdicts(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, None)
    assert a.run.agent.tpm is not None
    log = ImaLog(a.run.ima_path, a.run.agent.tpm.extend, BANKS)
    for path, content in BASE.items():
        await log.measure(path, content)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    public = make_client(tls.client_context([pki.ca]), timeout=20.0)
    root = rv.url.rsplit("/", 1)[0]
    q = (await a.run.get("/quotes/integrity", nonce=NONCE, mask="0x400", partial="0", ima_ml_entry="0")).json()
    q = q["results"]
    good = {
        "nonce": NONCE, "quote": q["quote"], "hash_alg": q["hash_alg"],
        "tpm_ak": base64.b64encode(a.run.info.ak_public).decode(), "tpm_ek": "",
        "tpm_policy": json.dumps({"mask": "0x400"}), "runtime_policy": json.dumps(policy_doc(BASE)),
        "mb_policy": "", "ima_measurement_list": q["ima_measurement_list"], "mb_log": "",
    }  # fmt: skip

    async def both(content: bytes, ctype: str = "application/json", version: str = "2.5") -> tuple[int, Any]:
        """The fast route's answer (exact path) and quart's (trailing slash); they must agree."""
        answers = []
        for suffix in ("", "/"):
            r = await public.post(f"{root}/v{version}/verify/evidence{suffix}", content=content,
                                  headers={"Content-Type": ctype})
            assert r.headers["content-type"] == "application/json"
            answers.append((r.status_code, r.json()))
        assert answers[0] == answers[1], answers
        return answers[0]

    def body(data: dict[str, Any]) -> bytes:
        return json.dumps({"type": "tpm", "data": data}).encode()

    code, doc = await both(body(good))
    assert code == 200 and doc["results"]["valid"] is True and doc["results"]["claims"] == good
    code, doc = await both(body(good), version="2.4")
    assert code == 200 and doc["results"]["valid"] == 1
    # a forged line under the same (now cached) policy: still caught, same failure on both paths
    lines = good["ima_measurement_list"].splitlines(keepends=True)
    forged_digest = hashlib.sha256(b"evil").hexdigest()
    last = lines[-1].split(" ")
    lines[-1] = " ".join([*last[:3], f"sha256:{forged_digest}", *last[4:]])
    code, doc = await both(body({**good, "ima_measurement_list": "".join(lines)}))
    assert code == 200 and doc["results"]["valid"] is False and doc["results"]["failures"]
    # a policy that does not list a file: refused by the cached policy's index, twice the same
    small = {**good, "runtime_policy": json.dumps(policy_doc(dict(list(BASE.items())[:-1])))}
    for _ in range(2):
        code, doc = await both(body(small))
        assert code == 200 and NOT_IN_ALLOWLIST in [f["type"] for f in doc["results"]["failures"]]
    # a refused policy and a bad AK are refused every time (failures are not cached)
    for _ in range(2):
        code, doc = await both(body({**good, "runtime_policy": '{"meta": {"version": 2}}'}))
        assert code == 400 and doc["results"]["failures"][0]["type"] == "runtime_policy.invalid_param"
        code, doc = await both(body({**good, "tpm_ak": "AAAA"}))
        assert code == 400 and doc["results"]["failures"][0]["type"] == "tpm_ak.invalid_param"
    # the request-level errors: malformed JSON, not an object, a wrong content type, no type
    code, doc = await both(b"{not json")
    assert code == 400 and doc["status"].startswith("Malformed JSON body")
    code, doc = await both(b"[1, 2]")
    assert code == 400 and doc["status"] == "JSON body must be an object"
    code, doc = await both(body(good), ctype="image/png")
    assert code == 400 and doc["status"].startswith("Unsupported content type 'image/png'")
    code, doc = await both(json.dumps({"data": good}).encode())
    assert code == 400 and doc["results"]["failures"][0]["type"] == "type.missing_param"
    code, doc = await both(b'{"type": "tpm", "type": "tpm"}')
    assert code == 400 and doc["status"].startswith("Malformed JSON body")
    # a version the verifier does not serve: quart's answer, on the exact path too
    r = await public.post(f"{root}/v9.9/verify/evidence", content=body(good))
    assert r.status_code == 400 and r.json()["status"].startswith("API version not supported")

    # the answer echoes the body's own bytes of ``data`` (no second encoding) when it is the last
    # member of an ASCII body; other layouts are encoded: every layout gives the same JSON
    spaced = b'{ "type" :"tpm" ,\t"data"\r\n: ' + json.dumps(good, indent=1).encode() + b" \n}\n"
    escaped = json.dumps({"type": "tpm", "data": {**good, "tpm_ek": "A\u00e9/\ud800"}}).encode()
    escaped = escaped.replace(b"/", b"\\/")  # an escape json.dumps would not write
    for content, spliced in (
        (spaced, True),
        (escaped, True),
        # compact: the encoded answer (default separators) does not hold these bytes of data
        (json.dumps({"data": good, "type": "tpm"}, separators=(",", ":")).encode(), False),  # data not last
        (json.dumps({"type": "tpm", "data": good}, ensure_ascii=False).encode().replace(b'""', '"\u00e9"'.encode(), 1),
         False),  # not ASCII (the empty tpm_ek becomes a raw e-acute)
        (json.dumps({"type": "tpm", "pad": "x" * 5000, "data": good}, separators=(",", ":")).encode(),
         False),  # the members before data run past the window
    ):
        code, doc = await both(content)
        assert code == 200 and doc["results"]["valid"] is True, doc
        assert doc["results"]["claims"] == json.loads(content)["data"]
        r = await public.post(f"{root}/v2.5/verify/evidence", content=content)
        data_text = content[content.index(b'"data"') + 6:].lstrip(b" \t\r\n:").rstrip(b" \t\r\n}")
        assert (data_text in r.content) is spliced, content[:80]
    # evidence too large to check inline runs in a worker thread: same verdicts
    padded_policy = policy_doc({**BASE, **{f"/opt/pad/{i}": b"x" for i in range(2000)}})
    big = {**good, "runtime_policy": json.dumps(padded_policy)}
    assert evidence.inline_size(big) > routes_verify.INLINE_MAX_CHARS
    code, doc = await both(body(big))
    assert code == 200 and doc["results"]["valid"] is True
    code, doc = await both(body({**big, "ima_measurement_list": "".join(lines)}))
    assert code == 200 and doc["results"]["valid"] is False
    await public.aclose()
    await rv.stop()
    await a.run.stop()


async def _raw(root: str, ctx: Any, payload: bytes, *, until_close: bool = True) -> bytes:
    """``payload`` written at once on a new TLS connection; everything read until the server
    closes (or the first complete answer when ``until_close`` is false)."""
    host, port = root.split("//", 1)[1].rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=ctx, https_compatible=True)
    await stream.send_all(payload)
    got = b""
    with trio.fail_after(20):
        while True:
            chunk = await stream.receive_some(1 << 16)
            got += chunk
            if not chunk or (not until_close and got.count(b"}}") and b"\r\n\r\n" in got):
                break
    await stream.aclose()
    return got


async def test_lean_http_path_keeps_http_semantics(nursery: trio.Nursery, tmp_path: Path, pki: Any) -> None:
    """The small-request path of serve.py (fast routes without hypercorn's per-request layers)
    answers malformed, closing and pipelined requests as hypercorn does."""
    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    root = rv.url.rsplit("/", 1)[0]
    ctx = tls.client_context([pki.ca])
    body = json.dumps({"type": "other", "data": {}}).encode()  # a 400 from the route itself

    def request(path: str, extra: bytes = b"", content: bytes = body) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(content)}\r\n").encode() + extra + b"\r\n" + content

    # Connection: close -> one answer, then the server closes (h11 adds the header)
    got = await _raw(root, ctx, request("/v2.5/verify/evidence", b"Connection: close\r\n"))
    assert got.startswith(b"HTTP/1.1 400 ") and got.count(b"HTTP/1.1") == 1
    assert b"connection: close" in got.lower() and b"unsupported evidence type" in got
    # two requests in one write: both answered, in order (hypercorn keeps pipelined order)
    got = await _raw(root, ctx, request("/v2.5/verify/evidence") + request("/v2.4/verify/evidence",
                                                                             b"Connection: close\r\n"))
    assert got.count(b"HTTP/1.1 400 ") == 2
    # a malformed header line: the same answer as on a path hypercorn parses (status + close)
    bad = b"Bad Header\r\n"
    lean = await _raw(root, ctx, request("/v2.5/verify/evidence", bad))
    plain = await _raw(root, ctx, request("/v2.5/verify/identity", bad))
    assert lean.split(b"\r\n", 1)[0] == plain.split(b"\r\n", 1)[0] and lean.startswith(b"HTTP/1.1 400")
    # keep-alive: several answers on one connection, then a non-fast request on the same one
    host, port = root.split("//", 1)[1].rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=ctx, https_compatible=True)
    for path in ("/v2.5/verify/evidence", "/v2.5/verify/evidence", "/version"):
        if path == "/version":
            await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            await stream.send_all(request(path))
        got = b""
        with trio.fail_after(20):
            while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
                got += await stream.receive_some(1 << 16)
        assert got.startswith(b"HTTP/1.1 200 " if path == "/version" else b"HTTP/1.1 400 "), got[:200]
    await stream.aclose()
    await rv.stop()
