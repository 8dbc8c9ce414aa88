"""Summaries of timing samples (median, p10, p90) and the keytrio/upstream ratio."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no samples")
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(samples: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p10": percentile(samples, 10),
        "p90": percentile(samples, 90),
    }


def compare(keytrio: Sequence[float], upstream: Sequence[float]) -> dict[str, Any]:
    """Both summaries; ``ratio`` = keytrio median / upstream median (< 1: keytrio is faster),
    ``speedup`` = its inverse."""
    k, u = summary(keytrio), summary(upstream)
    ratio = k["median"] / u["median"] if u["median"] else float("nan")
    return {"keytrio": k, "upstream": u, "ratio": ratio, "speedup": 1 / ratio if ratio else float("nan")}


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"
