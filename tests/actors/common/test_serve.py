"""serve.py + app.py over real sockets on 127.0.0.1 with a trustme CA (no mocks).

Each hypercorn 0.18 defect fixed in serve.py has its own test: a failing connection does not
stop the server, idle keep-alive connections time out (and do not hold up shutdown), rejected
handshakes are logged with a reason, and the app sees the peer certificate.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from functools import partial

import httpx
import pytest
import trio
from quart import Response, g, request

from keytrio.actors.common.app import ApiError, client_cert_der, json_body, make_app, ok
from keytrio.actors.common.serve import serve
from keytrio.actors.common.tls import client_context, server_context
from keytrio.protocol.versions import SERVER_VERSIONS, server_version_payload

SECRET = "s3cr3t-K-value"


def build_app(pki, *, trusted=None, require_client_cert=True, max_upload_size=1 << 20):
    app = make_app(
        "test",
        versions=SERVER_VERSIONS,
        public_routes=("/version", "/verify/*"),
        require_client_cert=require_client_cert,
        trusted_client_ca=[pki.ca] if trusted is None else trusted,
        max_upload_size=max_upload_size,
        version_payload=server_version_payload(),
    )

    @app.api.route("/echo", methods=["POST"])
    async def echo():
        doc = await json_body()
        return ok({"doc": doc, "api_version": g.api_version})

    @app.api.route("/size", methods=["POST"])
    async def size():
        return ok({"size": len(await request.get_data())})

    @app.api.route("/whoami")
    async def whoami():
        der = client_cert_der()
        tls = request.scope["extensions"]["tls"]
        return ok(
            {
                "sha256": hashlib.sha256(der).hexdigest() if der else None,
                "chain_len": len(tls["client_chain_der"]),
                "name": tls["client_cert_name"],
            }
        )

    @app.api.route("/agents/<agent_id>", methods=["GET", "DELETE"])
    async def agent(agent_id):
        return ok({"agent_id": agent_id, "api_version": g.api_version})

    @app.api.route("/agent/info", versions=("2.2", "2.3", "2.4", "2.5"))
    async def agent_info():
        return ok({"api_version": g.api_version})

    @app.api.route("/verify/evidence", methods=["POST"])
    async def verify_evidence():
        return ok({"public": True})

    @app.api.route("/boom")
    async def boom():
        raise RuntimeError(f"database password is {SECRET}")

    @app.api.route("/teapot")
    async def teapot():
        raise ApiError(418, "short and stout", {"hint": 1})

    app.slow_entered = trio.Event()  # set when /slow is in its handler

    @app.api.route("/slow")
    async def slow():
        app.slow_entered.set()
        await trio.sleep(0.5)
        return ok({"slow": True})

    @app.route("/plain")
    async def plain():
        return Response("not json", mimetype="text/plain")

    return app


async def start(nursery, app, ssl_ctx=None, **kwargs):
    return await nursery.start(partial(serve, app, host="127.0.0.1", port=0, ssl_context=ssl_ctx, **kwargs))


def tls_server(pki, mode="optional", cas=None):
    return server_context(pki.server.cert, pki.server.key, client_ca_files=cas or [pki.ca], mode=mode)


def mtls_client(pki, who=None, timeout=5.0):
    who = who if who is not None else pki.client
    ctx = client_context([pki.ca], who.cert if who else None, who.key if who else None)
    return httpx.AsyncClient(verify=ctx, timeout=timeout)


def anon_client(pki):
    return httpx.AsyncClient(verify=client_context([pki.ca]), timeout=5.0)


async def wait_for_log(caplog, *needles, timeout=5.0):
    """The server logs asynchronously; wait (bounded) until a record contains every needle."""
    with trio.fail_after(timeout):
        while True:
            for rec in caplog.records:
                text = rec.getMessage()
                if all(n.lower() in text.lower() for n in needles):
                    return text
            await trio.sleep(0.01)


async def read_response(stream) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length body from a trio stream."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# ---- defect 1: one bad connection never stops the server -----------------------------------


async def test_garbage_bytes_do_not_stop_plain_server(nursery, pki):
    host, port = await start(nursery, build_app(pki, require_client_cert=False))
    for garbage in (
        b"\x00\xff\xfe garbage \r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00",  # HTTP/2 prior knowledge
        b"GET /version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"POST /v2.1/size HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
        b"POST /v2.1/size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(garbage)
        with trio.fail_after(5):
            data = await read_response(stream)
        await stream.aclose()
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:100]
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://{host}:{port}/version")
    assert r.status_code == 200
    assert r.json()["results"]["current_version"] == "2.5"


async def test_h2c_upgrade_is_answered_in_http11(nursery, pki):
    host, port = await start(nursery, build_app(pki, require_client_cert=False))
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    with trio.fail_after(5):
        data = await read_response(stream)
    await stream.aclose()
    assert data.startswith(b"HTTP/1.1 200")


async def test_plain_http_to_tls_port_is_logged_and_server_survives(nursery, pki, caplog):
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    host, port = await start(nursery, build_app(pki), tls_server(pki))
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        while await stream.receive_some(4096):
            pass
    await stream.aclose()
    text = await wait_for_log(caplog, "TLS handshake from 127.0.0.1", "rejected", "http")
    assert "HTTP_REQUEST" in text or "http request" in text
    async with mtls_client(pki) as client:
        r = await client.get(f"https://{host}:{port}/v2.1/whoami")
    assert r.status_code == 200


async def test_client_abort_mid_handshake_is_logged_and_server_survives(nursery, pki, caplog):
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    host, port = await start(nursery, build_app(pki), tls_server(pki))
    # A genuine ClientHello, cut in half, then the client goes away.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context([pki.ca]).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(hello[: len(hello) // 2])
    await stream.aclose()
    await wait_for_log(caplog, "TLS handshake from 127.0.0.1", "rejected")
    async with mtls_client(pki) as client:
        r = await client.get(f"https://{host}:{port}/version")
    assert r.status_code == 200


# ---- defect 2: idle keep-alive connections time out; they do not hold shutdown up ------------


@pytest.mark.parametrize("use_tls", [False, True])
async def test_idle_keep_alive_connection_is_closed(nursery, pki, use_tls):
    app = build_app(pki, require_client_cert=False)
    host, port = await start(nursery, app, tls_server(pki) if use_tls else None, keep_alive_timeout=0.5)
    if use_tls:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=client_context([pki.ca]), https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    # two quart requests on one connection: the idle timer must survive each of them
    for _ in range(2):
        await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            response = await read_response(stream)
        assert response.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in response.lower()
    with trio.fail_after(10):  # guard only; the server closes after ~0.5 s
        assert await stream.receive_some(4096) == b""
    await stream.aclose()


async def test_shutdown_with_idle_keep_alive_client_is_prompt(pki):
    app = build_app(pki, require_client_cert=False)
    # guard only: without the fix the idle connection holds shutdown for graceful_timeout (60 s)
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            host, port = await outer.start(
                partial(serve, app, host="127.0.0.1", port=0, keep_alive_timeout=60.0, graceful_timeout=60.0)
            )
            # a client that keeps its idle keep-alive connection open throughout
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(stream)).startswith(b"HTTP/1.1 200")
            outer.cancel_scope.cancel()  # the nursery exit waits for serve() to shut down
        # the server closed the idle connection on its way out
        assert await stream.receive_some(4096) == b""
        await stream.aclose()


async def test_shutdown_lets_in_flight_request_finish(pki):
    app = build_app(pki, require_client_cert=False)
    async with trio.open_nursery() as outer:
        host, port = await outer.start(partial(serve, app, host="127.0.0.1", port=0, graceful_timeout=5.0))
        async with httpx.AsyncClient() as client:
            result = {}

            async def slow_request():
                r = await client.get(f"http://{host}:{port}/v2.1/slow")
                result["response"] = r

            async with trio.open_nursery() as inner:
                inner.start_soon(slow_request)
                await app.slow_entered.wait()
                outer.cancel_scope.cancel()  # shut the server down while it runs
        assert result["response"].status_code == 200
        assert result["response"].json()["results"] == {"slow": True}


# ---- defect 3 and trust: rejected handshakes, required / optional client certs --------------


async def test_cert_required_rejects_client_without_cert(nursery, pki, caplog):
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    host, port = await start(nursery, build_app(pki), tls_server(pki, "required"))
    async with anon_client(pki) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"https://{host}:{port}/version")
    await wait_for_log(caplog, "rejected", "certificate")


async def test_cert_required_rejects_client_from_other_ca(nursery, pki, caplog):
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    host, port = await start(nursery, build_app(pki), tls_server(pki, "required"))
    async with mtls_client(pki, pki.other_client) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"https://{host}:{port}/version")
    await wait_for_log(caplog, "rejected", "certificate verify failed")
    async with mtls_client(pki) as client:
        assert (await client.get(f"https://{host}:{port}/version")).status_code == 200


# ---- defect 4: the app sees the peer certificate ---------------------------------------------


async def test_app_sees_peer_certificate(nursery, pki):
    host, port = await start(nursery, build_app(pki), tls_server(pki, "required"))
    async with mtls_client(pki) as client:
        r = await client.get(f"https://{host}:{port}/v2.1/whoami")
    assert r.status_code == 200
    der = ssl.PEM_cert_to_DER_cert(pki.client.pem)
    results = r.json()["results"]
    assert results["sha256"] == hashlib.sha256(der).hexdigest()
    assert results["chain_len"] == 2  # leaf + the trustme CA
    assert results["name"]


async def test_cert_optional_public_and_protected_routes(nursery, pki):
    host, port = await start(nursery, build_app(pki), tls_server(pki, "optional"))
    base = f"https://{host}:{port}"
    async with anon_client(pki) as client:
        r = await client.get(f"{base}/version")
        assert r.status_code == 200
        assert r.json()["results"]["supported_versions"] == list(SERVER_VERSIONS)
        r = await client.post(f"{base}/v2.1/verify/evidence", json={})
        assert r.status_code == 200
        for path in ("/v2.1/whoami", "/v2.1/agents/abc", "/v2.1/nothing-here", "/v9.9/agents/x"):
            r = await client.get(base + path)
            assert r.status_code == 403, path
            body = r.json()
            assert body["code"] == 403 and "client certificate" in body["status"]
    async with mtls_client(pki) as client:
        r = await client.get(f"{base}/v2.1/whoami")
        assert r.status_code == 200 and r.json()["results"]["sha256"]


async def test_cert_optional_cert_from_other_ca(nursery, pki, caplog):
    caplog.set_level(logging.WARNING, logger="keytrio.serve")
    # TLS layer trusts only the CA: OpenSSL fails a presented-but-untrusted cert at the handshake
    host, port = await start(nursery, build_app(pki), tls_server(pki, "optional"))
    async with mtls_client(pki, pki.other_client) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"https://{host}:{port}/v2.1/whoami")
    await wait_for_log(caplog, "rejected", "certificate verify failed")


async def test_cert_optional_app_checks_its_own_ca(nursery, pki):
    # TLS layer trusts both CAs, the app only the server-components CA: JSON 403, not a reset
    ctx = tls_server(pki, "optional", cas=[pki.ca, pki.other_ca])
    host, port = await start(nursery, build_app(pki), ctx)
    base = f"https://{host}:{port}"
    async with mtls_client(pki, pki.other_client) as client:
        assert (await client.get(f"{base}/version")).status_code == 200
        r = await client.get(f"{base}/v2.1/whoami")
        assert r.status_code == 403
        assert r.json()["code"] == 403
    async with mtls_client(pki) as client:
        assert (await client.get(f"{base}/v2.1/whoami")).status_code == 200


# ---- 413 that reaches the client -----------------------------------------------------------


async def test_body_over_limit_gets_413_envelope(nursery, pki):
    host, port = await start(nursery, build_app(pki, require_client_cert=False))
    url = f"http://{host}:{port}/v2.1/size"
    big = b"x" * (2 << 20)

    async def chunked():
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + (64 << 10)]

    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(url, content=big)  # Content-Length
        assert r.status_code == 413
        assert r.json()["code"] == 413 and "limit" in r.json()["status"]
        r = await client.post(url, content=chunked())  # Transfer-Encoding: chunked
        assert r.status_code == 413
        assert r.json()["code"] == 413
        # 15 MiB: more than loopback socket buffers absorb (stock hypercorn + quart time out here)
        r = await client.post(url, content=b"z" * (15 << 20))
        assert r.status_code == 413 and r.json()["code"] == 413
        # under the limit, on the same client (connection reused): the body arrives whole
        r = await client.post(url, content=b"y" * (512 << 10))
        assert r.status_code == 200 and r.json()["results"]["size"] == 512 << 10


# ---- envelopes, versions, JSON bodies ------------------------------------------------------


async def test_versions_and_error_envelopes(nursery, pki, caplog):
    host, port = await start(nursery, build_app(pki), tls_server(pki, "optional"))
    base = f"https://{host}:{port}"
    async with mtls_client(pki) as client:
        for version in SERVER_VERSIONS:
            r = await client.get(f"{base}/v{version}/agents/a1")
            assert r.json() == {
                "code": 200,
                "status": "Success",
                "results": {"agent_id": "a1", "api_version": version},
            }
        for path in ("/v9.9/agents/a1", "/v1.0/agents/a1", "/v9.9/no/such/route"):
            r = await client.get(base + path)
            assert r.status_code == 400, path
            assert "API version not supported" in r.json()["status"]
        r = await client.get(f"{base}/v2.1/agent/info")
        assert r.status_code == 404 and r.json()["code"] == 404
        assert (await client.get(f"{base}/v2.2/agent/info")).json()["results"] == {"api_version": "2.2"}
        r = await client.get(f"{base}/v2.1/no/such/route")
        assert r.status_code == 404 and r.json() == {"code": 404, "status": "Not Found", "results": {}}
        r = await client.put(f"{base}/v2.1/agents/a1")
        assert r.status_code == 405 and r.json()["code"] == 405
        assert "GET" in r.headers["allow"]
        r = await client.get(f"{base}/v2.1/teapot")
        assert r.status_code == 418 and r.json() == {
            "code": 418,
            "status": "short and stout",
            "results": {"hint": 1},
        }
        caplog.set_level(logging.ERROR, logger="keytrio.app")
        r = await client.get(f"{base}/v2.1/boom")
        assert r.status_code == 500
        assert r.json() == {"code": 500, "status": "Internal Server Error", "results": {}}
        assert SECRET not in r.text
        assert any(rec.exc_info and "RuntimeError" in rec.exc_info[0].__name__ for rec in caplog.records)


async def test_json_body(nursery, pki):
    host, port = await start(nursery, build_app(pki, require_client_cert=False))
    url = f"http://{host}:{port}/v2.3/echo"
    async with httpx.AsyncClient() as client:
        r = await client.post(url, json={"a": [1, 2]})
        assert r.json()["results"] == {"doc": {"a": [1, 2]}, "api_version": "2.3"}
        # tornado's default content type for a JSON body (upstream's verifier) is accepted
        r = await client.post(
            url, content=b'{"a": 1}', headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert r.status_code == 200
        for content, ctype, needle in (
            (b"{not json", "application/json", "Malformed JSON"),
            (b"\xff\xfe", "application/json", "Malformed JSON"),
            (b"[1, 2]", "application/json", "must be an object"),
            (b"", "application/json", "Malformed JSON"),
            (b'{"a": 1}', "multipart/form-data; boundary=x", "content type"),
        ):
            r = await client.post(url, content=content, headers={"content-type": ctype})
            assert r.status_code == 400, content
            assert r.json()["code"] == 400 and needle in r.json()["status"]


async def test_make_app_refuses_client_cert_without_ca():
    with pytest.raises(ValueError):
        make_app("x", versions=("2.1",), require_client_cert=True)
