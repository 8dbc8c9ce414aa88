"""Version discovery for the push model: ``GET /version`` lists "3.0" when push is served (current
stays v2.x, so clients keep v2.x for the agents API), and the public v3.0 version root
``GET /v3/`` / ``/v3.0/`` answers 200 (upstream's answers 500). Real Verifier actor, real TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.protocol.versions import SERVER_VERSIONS, newest
from tests.actors.verifier.push_support import agent, start


@pytest.mark.parametrize("mode", ["push", "both", "pull"])
async def test_version_lists_3_0_only_when_push_is_served(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock, mode: str
) -> None:
    rv = await start(nursery, tmp_path, pki, clock, mode=mode)
    a = agent(rv, pki)  # no client certificate: /version and the v3 root are public
    resp = await a.client.get(a.base + "/version")
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert results["current_version"] == newest(SERVER_VERSIONS)
    expected = [*SERVER_VERSIONS, "3.0"] if mode != "pull" else list(SERVER_VERSIONS)
    assert results["supported_versions"] == expected
    for path in ("/v3/", "/v3.0/", "/v3", "/v3.0"):
        resp = await a.client.get(a.base + path)
        if mode == "pull":
            assert resp.status_code == 403, (path, resp.text)  # no route, no client cert
        else:
            assert resp.status_code == 200, (path, resp.text)
            assert resp.headers["content-type"].startswith("application/json")
            assert resp.json() == {"code": 200, "status": "Success", "results": {}}
    if mode != "pull":
        # the root is GET only; other methods are refused in the v3 error shape (without a client
        # cert the app says 403 first, as for any path it does not serve publicly)
        resp = await rv.admin.post(a.base + "/v3.0/", json={})
        assert resp.status_code == 405 and resp.json()["errors"][0]["status"] == "405", resp.text
        resp = await a.client.post(a.base + "/v3.0/", json={})
        assert resp.status_code == 403 and resp.json()["errors"][0]["status"] == "403", resp.text
    await rv.stop()
