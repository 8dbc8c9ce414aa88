"""The metrics/health listener: Prometheus text over plain HTTP, per-actor registries."""

import httpx
import trio

from keytrio.actors.common.metrics import Metrics, serve_metrics, timed


async def test_metrics_and_health_endpoints():
    a, b = Metrics("verifier"), Metrics("verifier")  # two actors in one process: separate counts
    polls = a.counter("polls_total", "Quote polls", ("result",))
    latency = a.histogram("poll_seconds", "Poll latency")
    b.counter("polls_total", "Quote polls", ("result",)).labels("ok").inc(7)
    healthy = True

    async def health():
        return {"ok": healthy, "agents": 2}

    @timed(latency)
    async def poll():
        await trio.sleep(0)
        polls.labels("ok").inc()

    for _ in range(3):
        await poll()
    async with trio.open_nursery() as n:
        host, port = await n.start(lambda task_status: serve_metrics(a, health=health, task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            r = await c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert 'keytrio_verifier_polls_total{result="ok"} 3.0' in r.text
            assert "keytrio_verifier_poll_seconds_count 3.0" in r.text
            h = await c.get("/health")
            assert h.status_code == 200 and h.json() == {"status": "ok", "ok": True, "agents": 2}
            healthy = False
            assert (await c.get("/health")).status_code == 503
        n.cancel_scope.cancel()
    assert host == "127.0.0.1"
