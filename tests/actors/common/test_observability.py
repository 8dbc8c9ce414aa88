"""Observability and CRLs of the running actors: /metrics + /health of registrar, verifier and agent
(real actors, real swtpm, real sockets), per-instance registries, and client certs revoked with
the CA of ``keytrio ca`` refused at the handshake by all three servers."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio
from prometheus_client.parser import text_string_to_metric_families

from keytrio.actors.ca.authority import Authority
from keytrio.actors.common import tls
from keytrio.actors.common.metrics import Metrics, serve_metrics
from keytrio.actors.common.store import Store
from keytrio.actors.registrar.actor import Registrar
from keytrio.actors.registrar.config import load_config as registrar_config
from keytrio.actors.registrar.service import store_health
from keytrio.actors.verifier import records
from tests.actors.agent_support import start_agent
from tests.actors.verifier_support import (
    GUARD,
    POLL,
    enrol,
    enrol_body,
    new_halves,
    post_u_and_verify,
    revocation_pair,
    start_test_agent,
    start_verifier,
    wait_notices,
)

ZERO32 = "00" * 32


async def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics`` as {(name, sorted labels): value}."""
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"http://{address[0]}:{address[1]}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def health(address: tuple[str, int]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.get(f"http://{address[0]}:{address[1]}/health")


async def wait_metric(address: tuple[str, int], pred: Any) -> dict:
    with trio.fail_after(GUARD):
        while True:
            samples = await scrape(address)
            if pred(samples):
                return samples
            await trio.sleep(POLL)


def _registrar(tls_opts: dict[str, Any], tmp: Path, **extra: Any) -> Registrar:
    return Registrar(registrar_config(None, env={}, overrides={
        "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(tmp / "registrar"),
        "graceful_timeout": 0.5, **tls_opts, **extra,
    }))


@pytest.mark.swtpm
async def test_metrics_and_health_of_running_actors(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any
) -> None:
    registrar = _registrar({"server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
                            "trusted_client_ca": [str(pki.ca)]}, tmp_path)
    reg = await nursery.start(registrar.run)
    assert reg.metrics is not None and reg.metrics[0] == "127.0.0.1"
    pair = revocation_pair(tmp_path / "rev")
    a = await start_test_agent(nursery, tmp_path / "a", pki, swtpm.tcti, pair,
                               registrar_ip="127.0.0.1", registrar_port=reg.http[1])
    agent = a.run.agent
    assert agent.metrics_address is not None

    # registrar: one new registration, one activation, one active agent
    s = await wait_metric(reg.metrics, lambda s: value(s, "keytrio_registrar_agents", state="active") == 1)
    assert value(s, "keytrio_registrar_registrations_total", result="new") == 1
    assert value(s, "keytrio_registrar_activations_total", result="activated") == 1
    r = await health(reg.metrics)
    assert r.status_code == 200 and r.json()["store"] == "ok"

    rv = await start_verifier(nursery, pki, tmp_path / "verifier")
    other = await start_verifier(nursery, pki, tmp_path / "verifier2")  # same process, own registry
    vm, om = rv.verifier.metrics_address, other.verifier.metrics_address
    assert vm is not None and om is not None and vm != om
    halves = new_halves()
    await enrol(rv, a.agent_id, enrol_body(a, v=halves.v, revocation_key=pair.key_pem,
                                           tpm_policy={"15": [ZERO32], "mask": "0x8000"}))
    await rv.wait(a.agent_id, lambda r: r["operational_state"] == records.GET_QUOTE and r["attestation_count"] >= 2)
    await post_u_and_verify(a, halves)

    # verifier: polls counted and rising, latency observed, the agent in get_quote
    first = await wait_metric(vm, lambda s: value(s, "keytrio_verifier_agents", state="get_quote") == 1)
    polls = value(first, "keytrio_verifier_polls_total", result="ok")
    assert polls >= 2
    later = await wait_metric(vm, lambda s: value(s, "keytrio_verifier_polls_total", result="ok") >= polls + 2)
    assert value(later, "keytrio_verifier_poll_seconds_count") >= polls + 2
    assert value(later, "keytrio_verifier_failures_total", event_id="pcr_validation.invalid_pcr_15") == 0
    # the second verifier in this process counted nothing
    o = await scrape(om)
    assert value(o, "keytrio_verifier_polls_total", result="ok") == 0
    assert value(o, "keytrio_verifier_agents", state="get_quote") == 0
    assert (await health(vm)).json() == {"status": "ok", "ok": True, "store": "ok", "monitors": 1}

    # agent: quotes served, TPM latency samples (quotes + the one ActivateCredential), U and V
    s = await scrape(agent.metrics_address)
    assert value(s, "keytrio_agent_quotes_total", kind="integrity", result="ok") >= polls
    assert value(s, "keytrio_agent_tpm_seconds_count", op="quote") >= polls
    assert value(s, "keytrio_agent_tpm_seconds_count", op="activate_credential") == 1
    assert value(s, "keytrio_agent_keys_total", half="v", result="stored") + \
        value(s, "keytrio_agent_keys_total", half="v", result="derived") == 1
    assert value(s, "keytrio_agent_keys_total", half="u", result="derived") + \
        value(s, "keytrio_agent_keys_total", half="u", result="stored") == 1
    r = await health(agent.metrics_address)
    assert r.status_code == 200 and r.json()["tpm"] == "open"

    # a changed policy PCR: failure by event id, the notice created, delivered, the state gauge
    assert agent.tpm is not None
    await agent.tpm.extend(15, {"sha256": hashlib.sha256(b"changed").digest()})
    await rv.wait_state(a.agent_id, records.INVALID_QUOTE)
    await wait_notices(a, 1)
    s = await wait_metric(vm, lambda s: value(s, "keytrio_verifier_agents", state="invalid_quote") == 1
                          and value(s, "keytrio_verifier_notice_deliveries_total", outcome="delivered") == 1
                          and value(s, "keytrio_verifier_notices_pending") == 0)
    assert value(s, "keytrio_verifier_failures_total", event_id="pcr_validation.invalid_pcr_15") == 1
    assert value(s, "keytrio_verifier_polls_total", result="failed") == 1
    assert value(s, "keytrio_verifier_notices_total") == 1
    assert value(s, "keytrio_verifier_agents", state="get_quote") == 0
    s = await wait_metric(agent.metrics_address,
                          lambda s: value(s, "keytrio_agent_notices_total", result="handled") == 1)
    assert value(await scrape(om), "keytrio_verifier_notices_total") == 0

    await other.stop()
    await rv.stop()
    await a.run.stop()
    assert agent.metrics_address is None and rv.verifier.metrics_address is None


async def test_health_503_when_the_store_is_unreachable(tmp_path: Path) -> None:
    # a database that cannot be opened (its directory does not exist): SELECT 1 fails
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'db.sqlite'}")
    store = Store(engine, trio.CapacityLimiter(1))
    metrics = Metrics("registrar")
    async with trio.open_nursery() as n:
        address = await n.start(lambda task_status: serve_metrics(
            metrics, health=lambda: store_health(store), task_status=task_status))
        r = await health(address)
        assert r.status_code == 503 and r.json()["ok"] is False and "unreachable" in r.json()["store"]
        n.cancel_scope.cancel()
    engine.dispose()


async def test_metrics_listener_disabled_by_negative_port(nursery: trio.Nursery, tmp_path: Path, pki: Any) -> None:
    registrar = _registrar({"server_cert": str(pki.server.cert), "server_key": str(pki.server.key),
                            "trusted_client_ca": [str(pki.ca)]}, tmp_path, metrics_port=-1)
    addresses = await nursery.start(registrar.run)
    assert addresses.metrics is None
    nursery.cancel_scope.cancel()


@pytest.mark.swtpm
async def test_revoked_client_cert_refused_by_every_actor(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, swtpm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Authority.init(tmp_path / "cv_ca")
    good = ca.issue("tenant-good", "client")
    early = ca.issue("tenant-early", "client")
    late = ca.issue("tenant-late", "client")
    ca.revoke("tenant-early")  # before the servers start
    cacert, crl = ca.dir / "cacert.crt", ca.dir / "cacrl.pem"
    tls_opts = {"tls_dir": str(ca.dir), "crl": "cacrl.pem"}  # relative: resolved against tls_dir

    registrar = _registrar(tls_opts, tmp_path)
    reg = await nursery.start(registrar.run)
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", server_cert="server-cert.crt",
                              server_key="server-private.pem", client_cert="client-cert.crt",
                              client_key="client-private.pem", trusted_client_ca=["cacert.crt"],
                              trusted_server_ca=["cacert.crt"], **tls_opts)
    agent = await start_agent(nursery, tmp_path / "agent", pki, swtpm.tcti, trusted_client_ca=[str(cacert)],
                              crl=str(crl))
    urls = {
        "registrar": (f"https://127.0.0.1:{reg.https[1]}/v2.1/agents/", None),
        "verifier": (rv.url + "/agents/", None),
        "agent": (agent.base + "/keys/pubkey", agent.info.mtls_cert),
    }

    async def accepted(name: str, files: Any) -> bool:
        url, pinned = urls[name]
        ctx = tls.client_context([cacert], files.cert, files.key, pinned_server_cert_pem=pinned)
        async with httpx.AsyncClient(verify=ctx, timeout=10) as c:  # a new connection each time
            try:
                r = await c.get(url)
            except httpx.TransportError:
                return False
        assert r.status_code == 200, (name, r.text)
        return True

    for name in urls:
        assert await accepted(name, good), name
        assert not await accepted(name, early), name
        assert await accepted(name, late), name  # not revoked yet

    ca.revoke("tenant-late")  # while every server runs: no restart
    for name in urls:
        with trio.fail_after(GUARD):  # the files are looked at once a second, on a new connection
            while await accepted(name, late):
                await trio.sleep(0.2)
        assert await accepted(name, good), name
        assert not await accepted(name, early), name

    caplog.set_level(logging.WARNING, logger="keytrio.tls")
    crl.write_text("not a CRL\n")  # a broken file: logged, the previous context stays in use

    def reload_failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "event=tls_reload_failed" in r.getMessage()]

    with trio.fail_after(GUARD):  # new connections make each server look at its files (once a second)
        while len(reload_failures()) < 3:
            for name in urls:
                assert await accepted(name, good), name
                assert not await accepted(name, late), name
            await trio.sleep(0.2)
    for name in urls:  # more connections: the previous context still serves, and no new log line
        assert await accepted(name, good), name
        assert not await accepted(name, late), name
    assert len(reload_failures()) == 3, reload_failures()  # once per server, not per connection
    await rv.stop()
    await agent.stop()
    nursery.cancel_scope.cancel()
