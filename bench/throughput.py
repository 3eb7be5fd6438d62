"""Throughput and latency of POST /predict at several concurrencies: the service, the bare ASGI floor app and the
peers, each on the same load generator, one row per request."""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ContextManager

from bench import cpu
from bench.loadgen import LoadResult, request_bytes, run_load
from bench.servers import Server


@dataclass(frozen=True)
class LoadFigures:
    requests_per_second: float
    p50: float
    p99: float
    errors: int
    loadgen_cpu_share: float  # shares of one core, while the load ran
    server_cpu_share: float
    others_cpu_share: float  # every other process on the machine


@dataclass(frozen=True)
class Run:
    load: LoadResult
    server_cpu_share: float
    others_cpu_share: float


def summarize(runs: list[Run]) -> LoadFigures:
    """Medians over repetitions of each repetition's figure; errors add up."""

    def quantile(result: LoadResult, q: float) -> float:
        ordered = sorted(result.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    results = [run.load for run in runs]
    return LoadFigures(
        requests_per_second=statistics.median(r.requests_per_second for r in results),
        p50=statistics.median(quantile(r, 0.50) for r in results),
        p99=statistics.median(quantile(r, 0.99) for r in results),
        errors=sum(r.errors for r in results),
        loadgen_cpu_share=statistics.median(r.cpu_share for r in results),
        server_cpu_share=statistics.median(run.server_cpu_share for run in runs),
        others_cpu_share=statistics.median(run.others_cpu_share for run in runs),
    )


def measure(
    starters: dict[str, Callable[[], ContextManager[Server]]], body: bytes, concurrencies: tuple[int, ...],
    seconds: float, warmup: float, reps: int, progress, alone: tuple[str, ...] = (),
) -> tuple[dict[tuple[str, int], LoadFigures], dict[str, str]]:
    """{(server, clients): figures} and {server: its event loop and HTTP parser}.

    The servers not in `alone` run all at once (an idle one costs nothing) and take turns at each concurrency, in
    an order that alternates between repetitions, so drift in the machine's load falls on them alike. Those in
    `alone` take CPU even when idle (LitServe's processes poll), so each runs only in its own turn: started,
    measured at every concurrency, stopped; their turns come after the others' in even repetitions, before in odd.
    """
    request = request_bytes("POST", "/predict", body)
    results: dict[tuple[str, int], list[Run]] = defaultdict(list)
    runtimes: dict[str, str] = {}

    def load(name: str, server: Server, clients: int, rep: int) -> None:
        busy, served = cpu.machine_busy_seconds(), cpu.group_seconds(server.process.pid)
        result = run_load(server.port, request, clients, seconds, warmup)
        busy, served = cpu.machine_busy_seconds() - busy, cpu.group_seconds(server.process.pid) - served
        wall = result.wall_seconds
        run = Run(result, served / wall, max(0.0, busy - served - result.cpu_seconds) / wall)
        results[name, clients].append(run)
        progress(
            f"  {clients:>2} clients, {name:<14} run {rep + 1}/{reps}: {result.requests_per_second:,.0f} req/s, "
            f"{result.errors} errors; CPU: server {run.server_cpu_share:.2f}, load generator {result.cpu_share:.2f}, "
            f"others {run.others_cpu_share:.2f}"
        )

    def ready(name: str, server: Server) -> Server:
        server.wait_ready()
        runtimes[name] = server.runtime()
        return server

    def own_turns(rep: int) -> None:
        for name in alone:
            with starters[name]() as server:
                ready(name, server)
                for clients in concurrencies:
                    load(name, server, clients, rep)

    together = [name for name in starters if name not in alone]
    with contextlib.ExitStack() as stack:
        running = {name: ready(name, stack.enter_context(starters[name]())) for name in together}
        for rep in range(reps):
            forward = rep % 2 == 0
            if not forward:
                own_turns(rep)
            for clients in concurrencies:
                for name in together if forward else together[::-1]:
                    load(name, running[name], clients, rep)
            if forward:
                own_turns(rep)
    return {key: summarize(runs) for key, runs in results.items()}, runtimes
