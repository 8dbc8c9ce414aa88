"""Body limits that fit real machines: an IMA list of 100,000 lines is accepted where evidence
and quote replies travel, small routes stay small, and a 413 names the option that raises it."""

from __future__ import annotations

import base64
import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from keytrio.actors.common import tls
from keytrio.actors.common.bodylimit import DEFAULT_DRAIN_LIMIT
from keytrio.actors.common.client import make_client
from keytrio.actors.verifier import records
from keytrio.actors.verifier.config import DEFAULT_MAX_EVIDENCE_SIZE, DEFAULT_MAX_POLICY_SIZE, load_config
from keytrio.protocol import ima
from keytrio.protocol.ima_eval import PCR_MISMATCH
from keytrio.protocol.runtime_policy import policy_document
from tests.actors.registrar_support import registrar_config, running_registrar
from tests.actors.verifier_support import (
    BANKS,
    enrol,
    enrol_body,
    new_halves,
    start_test_agent,
    start_verifier,
)

LINES = 100_000
NONCE = "abcdefghij0123456789"
SMALL = 1 << 20  # the default max_upload_size


def real_looking_list(n: int = LINES) -> tuple[str, dict[str, list[str]]]:
    """(ima-ng list of ``n`` lines, runtime-policy digests for it). Paths average ~86 characters,
    the mean of /usr/bin, /usr/lib, /usr/sbin and /etc on a Debian machine; SHA-1 template hashes
    and SHA-256 file digests, as ascii_runtime_measurements prints them."""
    lines, digests = [], {}
    for i in range(n):
        path = f"/usr/lib/python3/dist-packages/package{i % 997}/sub/module_{i}.cpython-311-x86_64-linux-gnu.so"
        digest = hashlib.sha256(path.encode()).digest()
        lines.append(ima.format_line(ima.build_entry("ima-ng", path, "sha256", digest)))
        digests[path] = [digest.hex()]
    return "".join(line + "\n" for line in lines), digests


async def declared_only(host: str, port: int, ctx: Any, method: str, target: str, length: int) -> tuple[int, dict]:
    """Announce a body of ``length`` bytes and read the answer. Past bodylimit.DEFAULT_DRAIN_LIMIT the
    server answers from the headers alone (and closes), so none is sent; below it, it is sent, as
    the server reads the rest of a refused body before answering (the client sees the 413)."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(30):
        tcp = await trio.open_tcp_stream(host, port)
        stream: Any = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True) if ctx else tcp
        async with stream:
            await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=[
                ("Host", host), ("Content-Type", "application/json"), ("Content-Length", str(length))])))
            if length <= DEFAULT_DRAIN_LIMIT:
                await stream.send_all(b"x" * length)
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    return status, json.loads(body)


@pytest.mark.swtpm
async def test_evidence_of_100000_lines_and_per_route_limits(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, None)
    default_response = load_config(env={}, overrides={}).max_response_size
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", max_response_size=default_response)
    text, digests = real_looking_list()
    # PCR 10 holds one measurement the list does not have: no prefix of it replays to the quote,
    # so the verdict needs the whole list parsed and replayed (a PCR 10 at zero would match the
    # empty prefix: the log may run ahead of the quote)
    assert a.run.agent.tpm is not None
    await a.run.agent.tpm.extend(10, {b: hashlib.new(b, b"elsewhere").digest() for b in BANKS})
    q = (await a.run.get("/quotes/integrity", nonce=NONCE, mask="0x10400", partial="0")).json()["results"]
    data = {
        "nonce": NONCE, "quote": q["quote"], "hash_alg": q["hash_alg"],
        "tpm_ak": base64.b64encode(a.run.info.ak_public).decode(), "tpm_ek": "",
        "tpm_policy": "", "runtime_policy": json.dumps(policy_document(digests=digests)),
        "mb_policy": "", "ima_measurement_list": text, "mb_log": "",
    }  # fmt: skip
    body = json.dumps({"type": "tpm", "data": data}).encode()
    line_bytes = len(text) / LINES
    print(f"100,000 ima-ng lines: {len(text)} bytes ({line_bytes:.0f} a line); evidence body {len(body)} bytes")
    assert 190 <= line_bytes <= 230
    assert SMALL * 16 < len(body) <= DEFAULT_MAX_EVIDENCE_SIZE

    # accepted and evaluated to the end: every line is in the policy, only PCR 10 (which the
    # swtpm never saw these lines extend) disagrees
    public = make_client(tls.client_context([pki.ca]), timeout=120.0)
    root = rv.url.rsplit("/", 1)[0]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        resp = await public.post(f"{root}/v2.5/verify/evidence", content=body,
                                 headers={"content-type": "application/json"})
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert resp.status_code == 200, resp.text[:300]
    res = resp.json()["results"]
    assert res["valid"] is False and [f["type"] for f in res["failures"]] == [PCR_MISMATCH]
    # server and client share this process: the peak counts the 24 MB answer (claims echo the
    # evidence) and its parse as well; a copy of the body per layer would show as a multiple
    print(f"peak traced memory during the request: {peak / len(body):.1f} x the body")
    assert peak < 12 * len(body)
    del body, res, resp

    # one byte over the limit: 413 naming the option
    host, port = root.split("//")[1].split(":")
    anon = tls.client_context([pki.ca])
    admin = tls.client_context([pki.ca], pki.client.cert, pki.client.key)
    for ctx, method, target, limit, option in (
        (anon, "POST", "/v2.1/verify/evidence", DEFAULT_MAX_EVIDENCE_SIZE, "max_evidence_size"),
        (admin, "POST", "/v2.1/allowlists/big", DEFAULT_MAX_POLICY_SIZE, "max_policy_size"),
        (admin, "POST", f"/v2.1/agents/{a.agent_id}", DEFAULT_MAX_POLICY_SIZE, "max_policy_size"),
        (admin, "PUT", f"/v2.1/agents/{a.agent_id}/stop", SMALL, "max_upload_size"),
    ):
        status, doc = await declared_only(host, int(port), ctx, method, target, limit + 1)
        assert status == 413 and doc["code"] == 413, (target, doc)
        assert f"limit of {limit} bytes" in doc["status"] and option in doc["status"], doc
    status, _ = await declared_only(host, int(port), admin, "PUT", f"/v2.1/agents/{a.agent_id}/stop", SMALL)
    assert status == 404  # at the limit: read, and answered by the route (no such agent yet)

    # the agent's quote reply with the same list, read by the monitor at the default
    # max_response_size: parsed to the end, the verdict is the PCR 10 mismatch
    a.run.ima_path.write_text(text)
    body2 = enrol_body(a, v=new_halves().v)
    body2["runtime_policy"] = base64.b64encode(json.dumps(policy_document(digests=digests)).encode()).decode()
    await enrol(rv, a.agent_id, body2)
    rec = await rv.wait_state(a.agent_id, records.INVALID_QUOTE)
    assert rec["last_event_id"] == PCR_MISMATCH, rec


async def test_registrar_routes_stay_small(pki: Any, tmp_path: Path) -> None:
    config = registrar_config(pki, tmp_path / "registrar")
    async with running_registrar(config, pki) as reg:
        host, port = reg.addresses.http
        for method, target in (("POST", "/v2.1/agents/d432fbb3-d2f1-4a97-9ef7-75bd81c0f000"),
                               ("PUT", "/v2.1/agents/d432fbb3-d2f1-4a97-9ef7-75bd81c0f000/activate")):
            status, doc = await declared_only(host, port, None, method, target, SMALL + 1)
            assert status == 413 and "max_upload_size" in doc["status"], doc
