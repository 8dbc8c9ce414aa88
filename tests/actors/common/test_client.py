"""client.py + tls.py client contexts against real servers on 127.0.0.1 (trustme CA, no mocks)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import trio
from quart import Response

from keytrio.actors.common.app import make_app, ok
from keytrio.actors.common.client import (
    CommunicationError,
    HttpError,
    KeepAliveClient,
    MalformedResponse,
    Reply,
    ResponseTooLarge,
    is_retryable,
    make_client,
    request_json,
    retry,
    retry_delay,
)
from keytrio.actors.common.serve import serve
from keytrio.actors.common.tls import client_context, server_context
from tests.ports import free_port


def build_app(pki):
    app = make_app(
        "client-test",
        versions=("2.1",),
        require_client_cert=True,
        trusted_client_ca=[pki.ca],
        version_payload={"supported_version": "2.1", "supported_versions": ["2.1"]},
    )

    @app.api.route("/echo", methods=["POST"])
    async def echo():
        from keytrio.actors.common.app import json_body

        return ok({"doc": await json_body()})

    @app.api.route("/big")
    async def big():
        return ok({"blob": "x" * 100_000})

    @app.api.route("/big-stream")
    async def big_stream():
        async def gen():
            for _ in range(100):
                yield b"y" * 10_000

        return Response(gen(), mimetype="application/json")  # chunked, no Content-Length

    @app.api.route("/not-json")
    async def not_json():
        return Response("<html>hi</html>", mimetype="text/html")

    @app.api.route("/fail500")
    async def fail500():
        return Response("upstream exploded", status=500, mimetype="text/plain")

    return app


async def start_tls(nursery, pki, cert=None, mode="required"):
    cert = cert or pki.server
    ctx = server_context(cert.cert, cert.key, client_ca_files=[pki.ca], mode=mode)
    return await nursery.start(partial(serve, build_app(pki), host="127.0.0.1", port=0, ssl_context=ctx))



async def test_request_json_success_and_http_errors(nursery, pki):
    host, port = await start_tls(nursery, pki)
    base = f"https://{host}:{port}"
    async with make_client(client_context([pki.ca], pki.client.cert, pki.client.key), timeout=5) as client:
        reply = await request_json(client, "POST", f"{base}/v2.1/echo", {"a": 1})
        assert reply == Reply(200, "Success", {"doc": {"a": 1}})
        reply = await request_json(client, "GET", f"{base}/version")
        assert reply.results["supported_versions"] == ["2.1"]

        with pytest.raises(HttpError) as info:
            await request_json(client, "POST", f"{base}/v2.5/echo", {})
        assert info.value.status_code == 400
        assert "API version not supported" in info.value.status_text
        assert not is_retryable(info.value)

        reply = await request_json(client, "GET", f"{base}/v2.1/nope", expect=None)
        assert reply.status_code == 404 and reply.status == "Not Found"

        with pytest.raises(HttpError) as info:  # not an envelope, but the status is what matters
            await request_json(client, "GET", f"{base}/v2.1/fail500")
        assert info.value.status_code == 500 and is_retryable(info.value)

        with pytest.raises(MalformedResponse):
            await request_json(client, "GET", f"{base}/v2.1/not-json")

        with pytest.raises(ResponseTooLarge):
            await request_json(client, "GET", f"{base}/v2.1/big", max_response_bytes=10_000)
        with pytest.raises(ResponseTooLarge):
            await request_json(client, "GET", f"{base}/v2.1/big-stream", max_response_bytes=10_000)
        reply = await request_json(client, "GET", f"{base}/v2.1/big", max_response_bytes=200_000)
        assert len(reply.results["blob"]) == 100_000


async def test_client_cert_is_sent_from_the_context(nursery, pki):
    # CERT_REQUIRED server: succeeds only if httpx really presents the context's client cert
    host, port = await start_tls(nursery, pki, mode="required")
    async with make_client(client_context([pki.ca]), timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"https://{host}:{port}/version")
    # the server forwards OpenSSL's alert, so the client learns why (TLS 1.3: after its handshake)
    assert info.value.kind == "tls" and "certificate required" in info.value.detail
    async with make_client(client_context([pki.ca], pki.client.cert, pki.client.key), timeout=5) as client:
        assert (await request_json(client, "GET", f"https://{host}:{port}/version")).status_code == 200


async def test_refused_is_a_communication_error():
    async with make_client(None, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"http://127.0.0.1:{free_port()}/version")
    assert info.value.kind == "refused"
    assert is_retryable(info.value)


async def silent_port(nursery) -> int:
    """A TCP server that accepts and reads but never answers."""

    async def silent(stream):
        async with stream:
            while await stream.receive_some(4096):
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_timeout_is_a_communication_error(nursery):
    port = await silent_port(nursery)
    async with make_client(None, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"http://127.0.0.1:{port}/version", timeout=0.3)
    assert info.value.kind == "timeout"


async def test_untrusted_server_is_a_tls_error(nursery, pki):
    host, port = await start_tls(nursery, pki, mode="optional")
    ctx = client_context([pki.other_ca], pki.client.cert, pki.client.key)
    async with make_client(ctx, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"https://{host}:{port}/version")
    assert info.value.kind == "tls"


async def test_pinned_self_signed_agent_cert(nursery, pki):
    # an agent: self-signed server cert, CERT_REQUIRED with the CA; peers pin its mtls_cert
    host, port = await start_tls(nursery, pki, cert=pki.agent, mode="required")
    url = f"https://{host}:{port}/version"
    good = client_context([pki.ca], pki.client.cert, pki.client.key, pinned_server_cert_pem=pki.agent.pem)
    assert good.check_hostname is False
    async with make_client(good, timeout=5) as client:
        assert (await request_json(client, "GET", url)).results["supported_version"] == "2.1"
    wrong = client_context(
        [pki.ca], pki.client.cert, pki.client.key, pinned_server_cert_pem=pki.other_agent.pem
    )
    async with make_client(wrong, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", url)
    assert info.value.kind == "tls"
    unpinned = client_context([pki.ca], pki.client.cert, pki.client.key)
    async with make_client(unpinned, timeout=5) as client:
        with pytest.raises(CommunicationError):
            await request_json(client, "GET", url)


def test_client_context_refuses_nonsense(pki):
    with pytest.raises(ValueError):
        client_context([])
    with pytest.raises(ValueError):
        client_context([pki.ca], pinned_server_cert_pem="not a cert")
    with pytest.raises(ValueError):
        server_context(pki.server.cert, pki.server.key, mode="optional")
    ctx = server_context(pki.server.cert, pki.server.key, client_ca_files=[pki.ca], mode="optional")
    assert ctx.minimum_version.name == "TLSv1_2"


def test_retry_delay_rule():
    assert [retry_delay(n, 2.0, True) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert [retry_delay(n, 2.0, False) for n in (1, 2, 3)] == [2.0, 2.0, 2.0]
    assert retry_delay(3, 0.5, True) == 0.5  # upstream: exponential needs a base above 1
    # past the float range: infinity (the monitor then waits retry_interval), never OverflowError
    assert retry_delay(2000, 2.0, True) == math.inf
    assert retry_delay(10**6, 3, True) == math.inf
    assert retry_delay(10**6, 2.0, False) == 2.0


async def test_retry_uses_trio_clock(autojump_clock):
    calls: list[float] = []
    seen: list[tuple[int, float]] = []

    async def flaky():
        calls.append(trio.current_time())
        if len(calls) < 4:
            raise CommunicationError("refused", "http://x", "nope")
        return "done"

    start = trio.current_time()
    result = await retry(
        flaky, retries=5, interval=3.0, exponential=True, on_retry=lambda n, e, d: seen.append((n, d))
    )
    assert result == "done"
    assert [round(t - start, 6) for t in calls] == [0.0, 3.0, 12.0, 39.0]  # 3, 9, 27
    assert seen == [(1, 3.0), (2, 9.0), (3, 27.0)]


async def test_retry_gives_up_and_skips_non_retryable(autojump_clock):
    attempts = 0

    async def always_500():
        nonlocal attempts
        attempts += 1
        raise HttpError(500, "Internal Server Error")

    with pytest.raises(HttpError):
        await retry(always_500, retries=2, interval=1.0, exponential=False)
    assert attempts == 3

    attempts = 0

    async def not_found():
        nonlocal attempts
        attempts += 1
        raise HttpError(404, "Not Found")

    start = trio.current_time()
    with pytest.raises(HttpError):
        await retry(not_found, retries=5, interval=1.0)
    assert attempts == 1 and trio.current_time() == start


# --- KeepAliveClient: the verifier's one connection per agent ------------------------------------


def build_peer_app(pki):
    """An app that says which client port each request came over (to see connection reuse)."""
    app = build_app(pki)

    @app.api.route("/peer")
    async def peer():
        from quart import request

        return ok({"port": request.scope["client"][1]})

    return app


async def start_peer(nursery, pki, *, keep_alive_timeout=5.0):
    ctx = server_context(pki.server.cert, pki.server.key, client_ca_files=[pki.ca], mode="required")
    return await nursery.start(partial(serve, build_peer_app(pki), host="127.0.0.1", port=0, ssl_context=ctx,
                                       keep_alive_timeout=keep_alive_timeout))


def agent_like_context(pki):
    return client_context([pki.ca], pki.client.cert, pki.client.key)


async def test_keepalive_client_reuses_one_connection(nursery, pki):
    host, port = await start_peer(nursery, pki)
    base = f"https://{host}:{port}/v2.1"
    async with KeepAliveClient(agent_like_context(pki), timeout=5, keepalive_expiry=4.0) as client:
        ports = {(await request_json(client, "GET", f"{base}/peer")).results["port"] for _ in range(5)}
        assert len(ports) == 1  # five requests, one TLS connection
        reply = await request_json(client, "POST", f"{base}/echo", {"a": [1, 2]})
        assert reply.results == {"doc": {"a": [1, 2]}}
        with pytest.raises(HttpError) as info:
            await request_json(client, "GET", f"{base}/nowhere")
        assert info.value.status_code == 404
        # an error reply keeps the connection usable
        assert (await request_json(client, "GET", f"{base}/peer")).results["port"] in ports


async def test_keepalive_client_survives_the_server_closing_idle_connections(nursery, pki, autojump_clock):
    del autojump_clock  # real sockets: the clock only decides when the server drops idle ones
    host, port = await start_peer(nursery, pki, keep_alive_timeout=0.5)
    base = f"https://{host}:{port}/v2.1"
    async with KeepAliveClient(agent_like_context(pki), timeout=5, keepalive_expiry=60.0) as client:
        first = (await request_json(client, "GET", f"{base}/peer")).results["port"]
        await trio.sleep(2)  # the server closed the idle connection; the client still holds it
        second = (await request_json(client, "GET", f"{base}/peer")).results["port"]
        assert second != first  # a new connection, and no error for the caller


async def test_keepalive_client_caps_and_errors(nursery, pki):
    host, port = await start_peer(nursery, pki)
    base = f"https://{host}:{port}/v2.1"
    async with KeepAliveClient(agent_like_context(pki), timeout=5) as client:
        with pytest.raises(ResponseTooLarge):
            await request_json(client, "GET", f"{base}/big", max_response_bytes=10_000)
        with pytest.raises(ResponseTooLarge):
            await request_json(client, "GET", f"{base}/big-stream", max_response_bytes=10_000)
        with pytest.raises(MalformedResponse):
            await request_json(client, "GET", f"{base}/not-json")
        with pytest.raises(HttpError) as info:
            await request_json(client, "GET", f"{base}/fail500")
        assert info.value.status_code == 500
        assert len((await request_json(client, "GET", f"{base}/big")).results["blob"]) == 100_000
    async with KeepAliveClient(client_context([pki.ca]), timeout=5) as client:  # no client cert
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"{base}/peer")
        assert info.value.kind == "tls"
    async with KeepAliveClient(None, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"http://127.0.0.1:{free_port()}/version")
        assert info.value.kind == "refused" and is_retryable(info.value)


async def test_keepalive_client_timeout(nursery):
    port = await silent_port(nursery)
    async with KeepAliveClient(None, timeout=5) as client:
        with pytest.raises(CommunicationError) as info:
            await request_json(client, "GET", f"http://127.0.0.1:{port}/version", timeout=0.3)
    assert info.value.kind == "timeout"
