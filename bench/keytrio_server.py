"""keytrio's verifier for the HTTP benchmarks, with upstream's (up.sh) certificates.

    python -m bench.keytrio_server CV_CA_DIR DATA_DIR [OVERRIDES_JSON]

OVERRIDES_JSON: more verifier options (e.g. ``{"quote_interval": 1.0}``, bench.fleet soak; with
``{"workers": 2, "database_url": "postgresql+psycopg://..."}`` the service runs as a supervisor and
2 worker processes, as ``keytrio verifier`` does: actors/verifier/workers.py). Prints ``PORT <n>``
on stdout once listening on 127.0.0.1; runs until SIGTERM/SIGINT (then stops cleanly: the workers
too). Both verifiers then present certificates of the same CA, so one client (one TLS
configuration) talks to both.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import trio

from keytrio.actors.verifier.config import load_config
from keytrio.actors.verifier.workers import make_service


async def serve(ca_dir: Path, data_dir: Path, extra: dict[str, object]) -> None:
    opts = {
        "ip": "127.0.0.1", "port": 0, "metrics_port": -1, "data_dir": str(data_dir),
        "server_cert": str(ca_dir / "server-cert.crt"), "server_key": str(ca_dir / "server-private.pem"),
        "client_cert": str(ca_dir / "client-cert.crt"), "client_key": str(ca_dir / "client-private.pem"),
        "trusted_client_ca": [str(ca_dir / "cacert.crt")], "trusted_server_ca": [str(ca_dir / "cacert.crt")],
        "max_upload_size": 100 << 20, **extra,
    }  # fmt: skip
    service = make_service(load_config(env={}, overrides=opts))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            _host, port = await nursery.start(service.run)
            print(f"PORT {port}", flush=True)
            async for _ in signals:  # a clean stop: a supervisor stops (and waits for) its workers
                break
            nursery.cancel_scope.cancel()


class GcStats:
    """Garbage-collection time per generation (KEYTRIO_BENCH_GC_STATS=1): a profiler charges a
    collection to whatever frame allocated when it struck, so only a gc callback can tell it."""

    def __init__(self) -> None:
        self.started = 0.0
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        g = info["generation"]
        self.count[g] += 1
        self.seconds[g] += time.perf_counter() - self.started
        self.collected[g] += info["collected"]

    def report(self) -> str:
        return "GC " + " ".join(f"gen{g}: {self.count[g]} runs {self.seconds[g] * 1e3:.1f} ms "
                                f"{self.collected[g]} collected" for g in range(3)) + f" (objects now {len(gc.get_objects())})"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    stats = GcStats() if os.environ.get("KEYTRIO_BENCH_GC_STATS") else None
    if stats is not None:
        gc.callbacks.append(stats)
    trio.run(serve, Path(sys.argv[1]), Path(sys.argv[2]), extra)
    if stats is not None:
        print(stats.report(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
