"""Prometheus metrics of the service, summed over every gunicorn worker, served by the master on METRICS_PORT.

Workers record into prometheus_client's multiprocess files (one set per worker pid, under
PROMETHEUS_MULTIPROC_DIR); the master reads and sums them on each scrape (`serve`). The public port never serves
them. The gunicorn side is hooks in service/gunicorn.conf.py: `prepare_directory` before the first fork, `serve`
once the master is ready, `worker_died` for each worker that exits.

Writing a multiprocess value costs microseconds (a lock and an mmap write per bucket, per counter), several per
request, 30 times what appending to a list costs. So the request path only appends to lists in the worker
(`Recorder`), turned into counts and written to the files at most METRICS_FLUSH_SECONDS (0.1 s) after a request
and at the app's shutdown: a scrape sees every request answered more than that long ago.

Everything here imports prometheus_client lazily: the library decides at import whether it is in multiprocess
mode, so the master must set the directory first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger("service.metrics")

PREFIX = "onnx_serve_"
# The label of every path that is not one of the app's routes, so that scanners cannot grow the label set.
OTHER_ROUTE = "other"
# Served by the app's Endpoint ahead of FastAPI's router, so not always among FastAPI's routes.
INFER_ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
REQUESTS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

# (kind, name, help, labels, options): docs/operations.md's metrics table lists the same.
FAMILIES = (
    ("counter", "requests", "HTTP requests answered, by route template and status code", ("route", "status"), {}),
    ("histogram", "request_duration_seconds", "time from a request's arrival to the end of its answer, by route",
     ("route",), {"buckets": LATENCY_BUCKETS}),
    ("histogram", "inference_duration_seconds", "time of one model run (a batch or a lone request), queueing excluded",
     (), {"buckets": LATENCY_BUCKETS}),
    ("histogram", "batch_rows", "rows in one model run", (), {"buckets": ROWS_BUCKETS}),
    ("histogram", "batch_requests", "requests served by one model run", (), {"buckets": REQUESTS_BUCKETS}),
    ("gauge", "queue_depth", "requests waiting for the model, summed over live workers", (),
     {"multiprocess_mode": "livesum"}),
    ("gauge", "model_load_seconds", "seconds the model load took (fetch, verify, open, warm up), slowest live worker",
     (), {"multiprocess_mode": "livemax"}),
    ("gauge", "model_bytes", "size of the served model file in bytes", (), {"multiprocess_mode": "livemax"}),
    ("gauge", "memory_limit_bytes", "the container's memory limit the budget comes from (0: none found)", (),
     {"multiprocess_mode": "livemax"}),
    ("gauge", "memory_budget_bytes", "memory for requests in flight, summed over live workers", (),
     {"multiprocess_mode": "livesum"}),
    ("gauge", "memory_in_use_bytes", "memory the requests in flight hold of the budget, summed over live workers", (),
     {"multiprocess_mode": "livesum"}),
    ("counter", "memory_refused", "requests refused for want of memory: 503 (retry) or 413 (never fits)", ("status",),
     {}),
    ("gauge", "model_info", "1 for the model the live workers serve: its name, storage generation and sha256",
     ("name", "generation", "sha256"), {"multiprocess_mode": "livemax"}),
)  # fmt: skip

_families: dict[str, Any] | None = None


def families() -> dict[str, Any]:
    """This process's metric objects, by short name, made once."""
    global _families
    if _families is None:
        _families = make_families()
    return _families


def make_families() -> dict[str, Any]:
    """New metric objects in no registry: in multiprocess mode the master reads the values from the files."""
    import prometheus_client

    kinds = {"counter": prometheus_client.Counter, "histogram": prometheus_client.Histogram,
             "gauge": prometheus_client.Gauge}  # fmt: skip
    return {
        name: kinds[kind](PREFIX + name, text, labels, registry=None, **options)
        for kind, name, text, labels, options in FAMILIES
    }


class RouteNames:
    """The route template a request path belongs to (`/v2/models/{name}/infer`), or OTHER_ROUTE: label values
    stay as few as the app's routes whatever paths clients send."""

    CACHE_SIZE = 4096

    def __init__(self, templates: Iterable[str]):
        from starlette.routing import compile_path

        templates = set(templates)
        self.cache = {path: path for path in templates if "{" not in path}
        self.patterns = [(compile_path(t)[0], t) for t in sorted(templates) if "{" in t]

    def __call__(self, path: str) -> str:
        name = self.cache.get(path)
        if name is None:
            name = next((template for regex, template in self.patterns if regex.match(path)), OTHER_ROUTE)
            if len(self.cache) < self.CACHE_SIZE:
                self.cache[path] = name
        return name


def app_routes(api: Any) -> list[str]:
    """The templates of every route the app answers: FastAPI's, and the inference routes served ahead of it."""
    return [route.path for route in api.routes if hasattr(route, "path")] + list(INFER_ROUTES)


class _Histogram:
    """Writes many observations of one histogram at once: what `Histogram.observe` does for each value, as one
    increment per bucket (prometheus-client 0.26's `_buckets` and `_sum`)."""

    def __init__(self, family: Any, buckets: Iterable[float]):
        self.family, self.bounds = family, np.asarray(buckets, dtype=np.float64)
        self.children: dict[tuple, Any] = {}

    def observe_all(self, labels: tuple, values: list[float]) -> None:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.family.labels(*labels) if labels else self.family
        # Bucket i counts the values in (bound i-1, bound i]: Prometheus buckets are "less than or equal".
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds) + 1)
        for bucket, count in zip(child._buckets, counts.tolist()):
            if count:
                bucket.inc(count)
        child._sum.inc(sum(values))


class Recorder:
    """A worker's metrics. The request path and the scheduler call `request` and `batch` on the event loop; those
    only append to lists, turned into counts and buckets and written to the multiprocess files by `flush`, which
    also reads the state of what it watches (the scheduler's queue, the memory budget)."""

    def __init__(
        self, flush_seconds: float, routes: Iterable[str] = INFER_ROUTES, metric_families: dict[str, Any] | None = None
    ):
        self.flush_seconds = flush_seconds
        self.families = metric_families or families()
        self.route_name = RouteNames(routes)
        # Each request's path, status and seconds since the last flush, in three columns: flush counts and groups
        # them in C (Counter, zip), not one request at a time.
        self.paths: list[str] = []
        self.statuses: list[int] = []
        self.seconds: list[float] = []
        self.runs: list[tuple[int, int, float]] = []  # (rows, requests, seconds) of each model run since then
        self.queue: Any = None  # the batching scheduler, whose queue depth each flush writes (`watch_queue`)
        self.depth_written: int | None = None
        self.budget: Any = None  # the memory budget (service/memory.py) whose state each flush writes
        self.memory_refusals: list[int] = []  # statuses of the requests refused for memory since the last flush
        self.memory_written: tuple[int, int, int] | None = None  # (limit, budget, in use) last written
        self.flush_armed = False
        self.request_children: dict[tuple[str, int], Any] = {}
        self.request_seconds = _Histogram(self.families["request_duration_seconds"], LATENCY_BUCKETS)
        self.inference_seconds = _Histogram(self.families["inference_duration_seconds"], LATENCY_BUCKETS)
        self.batch_rows = _Histogram(self.families["batch_rows"], ROWS_BUCKETS)
        self.batch_requests = _Histogram(self.families["batch_requests"], REQUESTS_BUCKETS)

    def attach(self, api: Any, store: Any, model_name: str) -> None:
        """Label requests by the routes of `api` (a FastAPI app), and record `store`'s model once it is loaded."""
        self.route_name = RouteNames(app_routes(api))
        store.after_load.append(("recording metrics", lambda: self.model_loaded(model_name, store.status)))

    def request(self, path: str, status: int, seconds: float) -> None:
        self.paths.append(path)
        self.statuses.append(status)
        self.seconds.append(seconds)
        if not self.flush_armed:
            self._arm()

    def batch(self, rows: int, requests: int, seconds: float) -> None:
        self.runs.append((rows, requests, seconds))
        if not self.flush_armed:
            self._arm()

    def watch_queue(self, scheduler: Any) -> None:
        """Write the scheduler's queue depth (`scheduler.depth`) with every flush: read there, not pushed by each
        request, which joins and leaves the queue between two flushes."""
        self.queue = scheduler

    def watch_memory(self, budget: Any) -> None:
        """Write the memory budget's state (service/memory.py) with every flush: read there, not pushed by each
        request, which admits and gives back its share many times between two flushes."""
        self.budget = budget

    def memory_refused(self, status: int) -> None:
        """A request the memory budget refused: 503 or 413."""
        self.memory_refusals.append(status)
        if not self.flush_armed:
            self._arm()

    def _arm(self) -> None:
        self.flush_armed = True
        asyncio.get_running_loop().call_later(self.flush_seconds, self.flush)

    def flush(self) -> None:
        """Write what was recorded since the last flush to this process's multiprocess files."""
        self.flush_armed = False
        paths, statuses, durations = self.paths, self.statuses, self.seconds
        self.paths, self.statuses, self.seconds = [], [], []
        runs, self.runs = self.runs, []
        routes = {path: self.route_name(path) for path in set(paths)}
        counts: dict[tuple[str, int], int] = {}
        for (path, status), count in Counter(zip(paths, statuses)).items():
            key = (routes[path], status)
            counts[key] = counts.get(key, 0) + count
        by_route: dict[str, list[float]] = {}
        if len(routes) == 1:  # the usual flush: every request on one route
            by_route[next(iter(routes.values()))] = durations
        else:
            for path, seconds in zip(paths, durations):
                by_route.setdefault(routes[path], []).append(seconds)
        for key, count in counts.items():
            child = self.request_children.get(key)
            if child is None:
                child = self.request_children[key] = self.families["requests"].labels(*key)
            child.inc(count)
        for route, seconds in by_route.items():
            self.request_seconds.observe_all((route,), seconds)
        if runs:
            rows, served, seconds = (list(column) for column in zip(*runs))
            self.inference_seconds.observe_all((), seconds)
            self.batch_rows.observe_all((), rows)
            self.batch_requests.observe_all((), served)
        depth = None if self.queue is None else self.queue.depth
        if depth is not None and depth != self.depth_written:
            self.families["queue_depth"].set(depth)
            self.depth_written = depth
        refusals, self.memory_refusals = self.memory_refusals, []
        budget = self.budget
        if budget is not None and budget.total is not None:
            memory = (budget.limit.bytes or 0, budget.total, budget.in_use)
            if memory != self.memory_written:
                for name, value in zip(("memory_limit_bytes", "memory_budget_bytes", "memory_in_use_bytes"), memory):
                    self.families[name].set(value)
                self.memory_written = memory
        for status in refusals:
            self.families["memory_refused"].labels(str(status)).inc()

    def memory_measured(self, limit: int | None, budget: int | None) -> None:
        """The budget set once the model is loaded; called from the loading thread, like `model_loaded`."""
        try:
            self.families["memory_limit_bytes"].set(limit or 0)
            self.families["memory_budget_bytes"].set(budget or 0)
        except Exception as exc:
            log.warning("could not record the memory budget in the metrics: %s", exc)

    def model_loaded(self, name: str, status: Any) -> None:
        """Record the loaded model (a `LoadStatus`); called once per load, from the loading thread. Never raises:
        a metrics file that cannot be written must not fail the model load."""
        try:
            end = status.finished_at or time.time()
            self.families["model_load_seconds"].set(end - status.started_at)
            self.families["model_bytes"].set(status.size_bytes or 0)
            generation = "" if status.generation is None else str(status.generation)
            self.families["model_info"].labels(name, generation, status.sha256 or "").set(1)
        except Exception as exc:
            log.warning("could not record the model in the metrics: %s", exc)


# --- the gunicorn master ------------------------------------------------------------------------------------------

_private_directory: Path | None = None
_server: Any = None  # the master's metrics HTTP server


def prepare_directory() -> Path:
    """Set PROMETHEUS_MULTIPROC_DIR for the workers, wiped of an earlier run's files.

    Unset, it is a private directory on tmpfs (/dev/shm, else /tmp): the container's root filesystem is
    read-only, and the files take an mmap write per flush.
    """
    global _private_directory
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.db"):
            old.unlink()
    else:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        directory = _private_directory = Path(tempfile.mkdtemp(prefix="onnx-serve-metrics-", dir=base))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def written_files(directory: str | Path, pattern: str = "*.db") -> list[str]:
    """The workers' metrics files that hold data. A worker creates its file empty and sizes it a moment later;
    prometheus_client cannot read it in between (struct.error), so a scrape at that moment would fail."""
    found = []
    for path in Path(directory).glob(pattern):
        with contextlib.suppress(OSError):  # removed since the glob: a dead worker's live gauge
            if path.stat().st_size >= 8:  # the used-bytes header
                found.append(str(path))
    return found


def serve(host: str, port: int) -> None:
    """Serve the workers' summed metrics on host:port from a thread of the master; a port in use stops start-up."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    class WrittenFilesCollector(multiprocess.MultiProcessCollector):
        def collect(self):  # every worker's files on each scrape, but for one still being created
            return self.merge(written_files(self._path), accumulate=True)

    registry = CollectorRegistry(support_collectors_without_names=True)
    WrittenFilesCollector(registry)
    global _server
    try:
        _server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.critical(f"METRICS_PORT {port} cannot be opened on {host}: {exc}; choose another METRICS_PORT "
                     "(not PORT), or 0 to turn metrics off")  # fmt: skip
        remove_directory()
        sys.exit(2)
    log.info("metrics on http://%s:%d/metrics", host, port)


def close_in_worker() -> None:
    """In a new worker: close the copy of the metrics socket it got from the master, so only the master holds it."""
    if _server is not None:
        _server.socket.close()


def worker_died(pid: int) -> None:
    """Drop a dead worker's live gauges (queue depth, model); its counters and histograms still count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def remove_directory() -> None:
    if _private_directory is not None:
        shutil.rmtree(_private_directory, ignore_errors=True)
