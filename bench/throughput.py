"""Throughput and latency of POST /predict at several concurrencies: the service, the bare ASGI floor app and the
peers, each on the same load generator, one row per request."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ContextManager

from bench.loadgen import LoadResult, request_bytes, run_load
from bench.servers import Server


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
    starters: dict[str, Callable[[], ContextManager[Server]]], body: bytes, concurrencies: tuple[int, ...],
    seconds: float, warmup: float, reps: int, progress,
) -> tuple[dict[tuple[str, int], LoadFigures], dict[str, str]]:
    """{(server, clients): figures} and {server: its event loop and HTTP parser}.

    Each server runs alone in its turn (started, measured at every concurrency, stopped), so no idle peer takes
    CPU from it (LitServe's processes poll even when idle); the order alternates between repetitions.
    """
    request = request_bytes("POST", "/predict", body)
    results: dict[tuple[str, int], list[LoadResult]] = defaultdict(list)
    runtimes: dict[str, str] = {}
    for rep in range(reps):
        order = list(starters) if rep % 2 == 0 else list(reversed(starters))
        for name in order:
            with starters[name]() as server:
                server.wait_ready()
                runtimes[name] = server.runtime()
                for clients in concurrencies:
                    result = run_load(server.port, request, clients, seconds, warmup)
                    results[name, clients].append(result)
                    progress(
                        f"  {clients:>2} clients, {name:<12} run {rep + 1}/{reps}: {result.requests_per_second:,.0f} "
                        f"req/s, {result.errors} errors, load generator {result.cpu_share:.0%} of a core"
                    )
    return {key: summarize(runs) for key, runs in results.items()}, runtimes
