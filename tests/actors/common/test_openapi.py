"""``GET /openapi.json`` of every server, fetched over its real (m)TLS socket, against its routes;
and the process metrics on every actor's ``/metrics``.

The route list is recomputed here from the running app's ``url_map`` (independently of
actors/common/openapi.py): every route with every method appears, nothing else; every operation
has a real summary; the documented parameterless GET routes answer over the socket (no 404).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import trio

from keytrio.actors.common import openapi
from tests.actors.agent_support import start_agent
from tests.actors.registrar_support import registrar_config, running_registrar
from tests.actors.verifier_support import start_verifier


def routes(app: Any) -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) of every rule of ``app`` (HEAD/OPTIONS are implicit)."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        out |= {(m, path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}


def check(doc: dict[str, Any], app: Any) -> None:
    assert doc["openapi"].startswith("3.")
    assert documented(doc) == routes(app)  # every route, nothing extra
    assert ("GET", "/openapi.json") in documented(doc)
    # the summary table names only real endpoints (a renamed one leaves no stale entry)
    assert set(openapi.SUMMARIES[app.name]) <= set(app.view_functions)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            # a summary of its own (not the fallback "METHOD path"): a new route needs one
            assert op["summary"] and op["summary"] != f"{method.upper()} {path}", (method, path)
            names = set(re.findall(r"{(\w+)}", path))
            assert {p["name"] for p in op.get("parameters", [])} == names, (method, path)


async def process_metrics(address: tuple[str, int] | None) -> None:
    """The standard process collector's metrics are on the actor's /metrics."""
    assert address is not None
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get("http://{}:{}/metrics".format(*address))).text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_info"):
        assert f"\n{name}" in text, name


async def probe(client: httpx.AsyncClient, base: str, doc: dict[str, Any]) -> None:
    """The documented GET routes without path parameters (but the version) are routed there: an
    answer of the route itself (200, or 400 for missing query parameters), never 404/405."""
    for path, ops in doc["paths"].items():
        if "get" in ops and set(re.findall(r"{(\w+)}", path)) <= {"api_version"}:
            r = await client.get(base + path.replace("{api_version}", "2.1"))
            assert r.status_code in (200, 400), (path, r.status_code, r.text)


async def test_verifier_openapi_over_mtls(tmp_path: Path, pki: Any, nursery: trio.Nursery) -> None:
    v = await start_verifier(nursery, pki, tmp_path / "verifier")
    root = v.url.removesuffix("/v2.1")
    r = await v.admin.get(root + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    check(doc, v.verifier.app)
    assert doc["paths"]["/v{api_version}/agents/{agent_id}"]["post"]["security"] == [{"mutualTLS": []}]
    assert doc["paths"]["/v{api_version}/verify/evidence"]["post"]["security"] == []  # a public route
    await probe(v.admin, root, doc)
    await process_metrics(v.verifier.metrics_address)
    # like the API itself: without a client certificate, no document
    from keytrio.actors.common import tls
    from keytrio.actors.common.client import make_client
    async with make_client(tls.client_context([pki.ca]), timeout=10.0) as anonymous:
        assert (await anonymous.get(root + "/openapi.json")).status_code == 403
    v.scope.cancel()
    await v.done.wait()


async def test_registrar_openapi_on_both_ports(tmp_path: Path, pki: Any) -> None:
    async with running_registrar(registrar_config(pki, tmp_path), pki) as reg:
        agent_app, admin_app = reg.registrar.apps["agent"], reg.registrar.apps["admin"]
        doc = (await reg.admin.get("/openapi.json")).json()
        check(doc, admin_app)
        await probe(reg.admin, "", doc)
        doc = (await reg.agent.get("/openapi.json")).json()  # the agents' plain-HTTP port
        check(doc, agent_app)
        await process_metrics(reg.addresses.metrics)
        assert ("POST", "/v{api_version}/agents/{agent_id}") in documented(doc)


async def test_agent_openapi_over_mtls(tmp_path: Path, pki: Any, swtpm: Any, nursery: trio.Nursery) -> None:
    r = await start_agent(nursery, tmp_path, pki, swtpm.tcti)
    resp = await r.client.get(r.root + "/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    check(doc, r.agent.app)
    await process_metrics(r.agent.metrics_address)
    assert ("GET", "/v{api_version}/quotes/identity") in documented(doc)
    await r.stop()
