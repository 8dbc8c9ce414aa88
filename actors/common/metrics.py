"""Per-actor Prometheus metrics and a health endpoint, served on their own plain-HTTP port.

Each actor owns a :class:`Metrics` (its own ``CollectorRegistry``: two actors in one process keep
separate counts). ``serve_metrics`` serves ``GET /metrics`` (Prometheus text format) and
``GET /health`` on a separate listener, bound to localhost by default, so scraping never needs
the mTLS client certificates of the API port.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from quart import Response
from quart_trio import QuartTrio

from keytrio.actors.common.serve import serve

HealthFn = Callable[[], Awaitable[dict[str, Any]]]

#: Latency buckets (seconds) for polls and TPM operations: sub-millisecond to tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """A registry plus factory helpers; metric names are prefixed ``keytrio_<actor>_``.

    The registry also holds the standard process metrics (``process_cpu_seconds_total``,
    ``process_resident_memory_bytes``, ``process_open_fds``, ...), ``python_info`` and the
    garbage collector's ``python_gc_*``, as every Prometheus client exports them.
    """

    def __init__(self, actor: str) -> None:
        self.actor = actor
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def full_name(self, name: str) -> str:
        """The exported name of metric ``name`` (``keytrio_<actor>_<name>``)."""
        return f"keytrio_{self.actor}_{name}"

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(self.full_name(name), doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(self.full_name(name), doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(self.full_name(name), doc, labels, registry=self.registry, buckets=buckets)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_app(metrics: Metrics, health: HealthFn | None = None) -> QuartTrio:
    app = QuartTrio(f"keytrio-{metrics.actor}-metrics")

    @app.route("/metrics")
    async def render() -> Response:
        # generate_latest walks the registry synchronously; it is small and never blocks on I/O.
        return Response(metrics.render(), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.route("/health")
    async def healthz() -> tuple[dict[str, Any], int]:
        details = await health() if health is not None else {}
        ok = bool(details.get("ok", True))
        return {"status": "ok" if ok else "unhealthy", **details}, 200 if ok else 503

    return app


async def serve_metrics(
    metrics: Metrics,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    health: HealthFn | None = None,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics and /health until cancelled; reports the bound (host, port).

    ``listeners``: already bound sockets (see serve()); ``host``/``port`` are then ignored."""
    await serve(metrics_app(metrics, health), host=host, port=port, ssl_context=None,
                graceful_timeout=0.5, listeners=listeners, task_status=task_status)


def timed(histogram: Histogram) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorator: observe an async function's duration (trio's clock) in ``histogram``."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def inner(*args: Any, **kwargs: Any) -> Any:
            start = trio.current_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                histogram.observe(trio.current_time() - start)

        return inner

    return wrap
