"""Throughput and latency of POST /predict at several concurrencies, against the bare ASGI floor app.

Both servers run at once (the idle one costs nothing) and take turns, in alternating order, so drift in the
machine's load falls on both alike.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.loadgen import LoadResult, request_bytes, run_load


@dataclass(frozen=True)
class LoadFigures:
    requests_per_second: float
    p50: float
    p99: float
    errors: int
    loadgen_cpu_share: float


def summarize(results: list[LoadResult]) -> LoadFigures:
    """Medians over repetitions of each repetition's figure; errors add up."""

    def quantile(result: LoadResult, q: float) -> float:
        ordered = sorted(result.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return LoadFigures(
        requests_per_second=statistics.median(r.requests_per_second for r in results),
        p50=statistics.median(quantile(r, 0.50) for r in results),
        p99=statistics.median(quantile(r, 0.99) for r in results),
        errors=sum(r.errors for r in results),
        loadgen_cpu_share=statistics.median(r.cpu_share for r in results),
    )


def measure(
    ports: dict[str, int], body: bytes, clients: int, seconds: float, warmup: float, reps: int, progress
) -> dict[str, LoadFigures]:
    """{name: figures} for each server in `ports`, `reps` runs each of `seconds` after `warmup`."""
    request = request_bytes("POST", "/predict", body)
    results: dict[str, list[LoadResult]] = {name: [] for name in ports}
    for rep in range(reps):
        order = list(ports) if rep % 2 == 0 else list(reversed(ports))
        for name in order:
            result = run_load(ports[name], request, clients, seconds, warmup)
            results[name].append(result)
            progress(
                f"  {clients:>2} clients, {name:<7} run {rep + 1}/{reps}: {result.requests_per_second:,.0f} req/s, "
                f"{result.errors} errors, load generator {result.cpu_share:.0%} of a core"
            )
    return {name: summarize(runs) for name, runs in results.items()}
