"""A load generator that is cheap on CPU, since it shares the machine's cores with the server it measures.

One asyncio event loop in this process drives N keep-alive HTTP/1.1 connections over raw sockets: each
connection sends a pre-encoded request (the same one, or the next of a list in turn), waits for the whole response
(read by Content-Length), and sends the next one at once (a closed loop). No HTTP library, no per-request objects
beyond a latency sample.

`python -m bench.loadgen` runs one load in a child process pinned to given CPUs (`invoke tune` puts it on the CPUs
the measured container leaves free): the parameters as JSON on stdin, the figures as JSON on stdout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field

DESCRIPTION = "asyncio raw-socket HTTP/1.1 keep-alive client, one process, closed loop (bench/loadgen.py)"


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of the responses counted, in seconds
    errors: int = 0
    cpu_seconds: float = 0.0  # this process's CPU time while the load ran
    wall_seconds: float = 0.0  # how long it ran, warm-up included

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def cpu_share(self) -> float:
        """Share of one core the load generator used."""
        return self.cpu_seconds / self.wall_seconds


def request_bytes(
    method: str, path: str, body: bytes = b"", content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    if body or method == "POST":
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class _Connection(asyncio.Protocol):
    def __init__(self, requests: "itertools.cycle[bytes]", result: LoadResult, count_from: float, stop_at: float,
                 done: asyncio.Future):  # fmt: skip
        self.requests, self.result, self.count_from, self.stop_at, self.done = requests, result, count_from, stop_at, done
        self.buffer = bytearray()
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(next(self.requests))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        try:
            status, length = int(head[9:12]), _content_length(head)
        except ValueError:  # not a response we can frame: count it and give up this connection
            self.result.errors += 1
            self.transport.close()
            return
        if len(self.buffer) < end + 4 + length:
            return
        now = time.perf_counter()
        del self.buffer[: end + 4 + length]
        if self.sent_at >= self.count_from:
            if 200 <= status < 300:
                self.result.latencies.append(now - self.sent_at)
            else:
                self.result.errors += 1
        if now < self.stop_at:
            self._send()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.stop_at:  # the server dropped a connection mid-run
            self.result.errors += 1
        if not self.done.done():
            self.done.set_result(None)


def _content_length(head: bytes) -> int:
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    stop = head.find(b"\r\n", start + 2)
    return int(head[start + 17 : stop if stop >= 0 else None])


async def _drive(port: int, request: bytes | list[bytes], clients: int, warmup: float, seconds: float) -> LoadResult:
    loop = asyncio.get_running_loop()
    result = LoadResult(clients, seconds)
    started = time.perf_counter()
    count_from, stop_at = started + warmup, started + warmup + seconds
    dones = []
    bodies = [request] if isinstance(request, bytes) else list(request)
    for number in range(clients):
        # each connection starts at another body, so that a list of samples is sent evenly at any concurrency
        requests = itertools.cycle(bodies[number % len(bodies):] + bodies[: number % len(bodies)])
        done = loop.create_future()
        dones.append(done)
        await loop.create_connection(
            lambda done=done, requests=requests: _Connection(requests, result, count_from, stop_at, done), "127.0.0.1", port
        )
    cpu = time.process_time()
    await asyncio.wait_for(asyncio.gather(*dones), warmup + seconds + 60)
    result.cpu_seconds = time.process_time() - cpu
    result.wall_seconds = time.perf_counter() - started
    return result


def run_load(port: int, request: bytes | list[bytes], clients: int, seconds: float, warmup: float = 1.0) -> LoadResult:
    """`clients` connections send `request` (or the requests of a list, in turn) back to back for `warmup` +
    `seconds`; only the last `seconds` count."""
    return asyncio.run(_drive(port, request, clients, warmup, seconds))


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of values already sorted (0 when there are none)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))]


def summary(result: LoadResult) -> dict:
    """What a load's caller needs, without the latency samples: rates, percentiles in ms, errors, CPU share."""
    latencies = sorted(result.latencies)
    return {
        "clients": result.clients, "requests": len(latencies), "rps": result.requests_per_second,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "errors": result.errors, "cpu_share": result.cpu_share if result.wall_seconds else 0.0,
    }  # fmt: skip


def main() -> None:
    """One load in this process, on the CPUs given: {"port", "requests": [latin-1 text], "clients", "seconds",
    "warmup", "cpus": [ids] or null} on stdin; summary() as JSON on stdout."""
    job = json.load(sys.stdin)
    if job.get("cpus"):
        os.sched_setaffinity(0, job["cpus"])
    requests = [text.encode("latin-1") for text in job["requests"]]
    result = run_load(job["port"], requests, job["clients"], job["seconds"], job["warmup"])
    json.dump(summary(result), sys.stdout)


if __name__ == "__main__":
    main()
