"""Prometheus metrics: real gunicorn masters with two Uvicorn workers on 127.0.0.1, scraped on METRICS_PORT as
Prometheus would, and the worker-side recorder against prometheus_client's own arithmetic."""

from __future__ import annotations

import asyncio
import types
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.waiting import wait_for
from tests.support.server import GUNICORN, ROOT, run_service, service_env

ROW = [5.1, 3.5, 1.4, 0.2]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics on `port`: {(sample name, labels): value}."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def scrape_when_counted(port: int, expected: dict, skip: tuple[str, ...] = ()) -> dict:
    """The scrape once the request counts equal `expected` (workers write theirs within METRICS_FLUSH_SECONDS)."""
    last = {}

    def counted():
        last["samples"] = scrape(port)
        return requests_by_route(last["samples"], skip) == expected

    with contextlib.suppress(TimeoutError):
        wait_for(counted, 10, what="the request counts on /metrics")
    assert requests_by_route(last["samples"], skip) == expected
    return last["samples"]


def value(samples: dict, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def requests_by_route(samples: dict, skip: tuple[str, ...] = ()) -> dict[tuple[str, str], float]:
    """{(route, status): count} of onnx_serve_requests_total, but for the routes in `skip`."""
    counts = {}
    for (name, labels), count in samples.items():
        if name == "onnx_serve_requests_total":
            labels = dict(labels)
            if labels["route"] not in skip:
                counts[labels["route"], labels["status"]] = count
    return counts


def workers(service) -> list[int]:
    pid = service.process.pid
    return sorted(int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def per_worker(directory: Path, kind: str, sample: str) -> dict[int, float]:
    """{pid: the sum of `sample`'s values} in each worker's own file of `kind` (the files the master sums)."""
    found = {}
    for name in metrics.written_files(directory, f"{kind}_*.db"):
        pid = int(Path(name).stem.rsplit("_", 1)[1])
        families = MultiProcessCollector.merge([name])
        found[pid] = sum(s.value for f in families for s in f.samples if s.name == sample)
    return found


def served_by_each_worker(directory: Path) -> dict[int, float]:
    return per_worker(directory, "counter", "onnx_serve_requests_total")


def wait_for_models(service, directory: Path, replacing: list[int] = ()) -> list[int]:
    """The pids of two workers, none of `replacing`, once both have recorded their loaded model (so neither
    answers 503)."""

    def loaded():
        service._alive()
        pids = workers(service)
        recorded = {pid for pid, n in per_worker(directory, "gauge_livemax", "onnx_serve_model_info").items() if n}
        return len(pids) == 2 and set(pids) <= recorded and not set(pids) & set(replacing) and pids

    return wait_for(loaded, 60, what="2 workers with the model loaded")


@dataclass(frozen=True)
class Call:
    route: str  # the label the service must count it under
    path: str
    body: object  # JSON, or bytes sent as they are
    rows: int = 0  # rows the model runs when it answers 200


def send(url: str, calls: list[Call], threads: int = 16) -> tuple[Counter, int]:
    """Make every call from `threads` threads, a new connection each, so that the workers share them; the
    {(route, status): count} of the answers, and the rows of those answered 200.

    Counted from the answers rather than assumed: a worker reports its model loaded to the metrics a moment
    before it answers 200 instead of 503."""

    def post(call: Call) -> int:
        content = call.body if isinstance(call.body, bytes) else None
        json = None if content else call.body
        return httpx.post(url + call.path, json=json, content=content, timeout=30).status_code

    with ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(post, calls))
    answered = Counter((call.route, str(status)) for call, status in zip(calls, statuses))
    return answered, sum(call.rows for call, status in zip(calls, statuses) if status == 200)


def predictions(count: int) -> list[Call]:
    return [Call("/predict", "/predict", {"inputs": [ROW]}, 1)] * count


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` holds a listening socket on (from /proc: its socket inodes, and the kernel's tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def multiproc_dir(tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    return directory


@pytest.mark.slow
def test_metrics_are_summed_over_two_workers_on_their_own_port(demo_model, tmp_path, multiproc_dir):
    # Counts left by an earlier run must not count: the master wipes the directory at start.
    stale = MmapedDict(str(multiproc_dir / "counter_1.db"))
    stale.write_value(mmap_key("onnx_serve_requests", "onnx_serve_requests_total", ["route", "status"],
                               ["/predict", "200"], ""), 1000.0, 0.0)  # fmt: skip
    stale.close()
    metrics_port = free_port()
    env = dict(WEB_CONCURRENCY="2", METRICS_PORT=str(metrics_port), PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir))
    with run_service(str(demo_model), tmp_path, **env) as service:
        pids = wait_for_models(service, multiproc_dir)
        assert listening_ports(service.process.pid) == {service.port, metrics_port}
        assert [listening_ports(pid) for pid in pids] == [{service.port}, {service.port}]
        assert httpx.get(service.url + "/metrics").status_code == 404

        sent, rows = Counter({("other", "404"): 1}), 0
        infer = "/v2/models/{name}/infer"
        v2_body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": ROW * 2}]}
        calls = [Call("/predict", "/predict", {"inputs": {"features": [ROW] * n}}, n) for n in [1, 2, 3] * 8]
        calls += [Call("/predict", "/predict", b"{not json"), Call("/predict", "/predict", {"inputs": [[1.0, 2.0]]})]
        calls += [Call(infer, "/v2/models/demo/infer", v2_body, 2), Call(infer, "/v2/models/nope/infer", v2_body)]
        # Rounds of mixed requests until both workers have answered some (the kernel picks who accepts).
        for _ in range(20):
            if all(served_by_each_worker(multiproc_dir).get(pid) for pid in pids):
                break
            answered, answered_rows = send(service.url, calls)
            sent += answered
            rows += answered_rows
            for route, path in (("/metadata", "/metadata"), ("other", "/wp-login.php")):
                sent[route, str(httpx.get(service.url + path).status_code)] += 1
            time.sleep(0.2)  # METRICS_FLUSH_SECONDS: the counts are written
        else:
            pytest.fail("one worker answered all of 20 rounds of requests")
        assert {("/predict", "400"), ("/predict", "422"), (infer, "200"), (infer, "404"), ("other", "404")} <= set(sent)

        samples = scrape_when_counted(metrics_port, dict(sent))
        by_worker = served_by_each_worker(multiproc_dir)
        assert sorted(by_worker) == pids and all(by_worker.values())
        assert sum(by_worker.values()) == sum(sent.values())

        predict_count = sum(count for (route, _), count in sent.items() if route == "/predict")
        assert value(samples, "onnx_serve_request_duration_seconds_count", route="/predict") == predict_count
        latency = "onnx_serve_request_duration_seconds"
        assert value(samples, f"{latency}_bucket", route="/predict", le="+Inf") == predict_count
        assert 0 < value(samples, "onnx_serve_request_duration_seconds_sum", route="/predict") < predict_count
        # Every request that reached the model is in exactly one run; runs are counted once in each histogram.
        model_requests = sent["/predict", "200"] + sent[infer, "200"]
        assert value(samples, "onnx_serve_batch_requests_sum") == model_requests
        assert value(samples, "onnx_serve_batch_rows_sum") == rows
        runs = value(samples, "onnx_serve_inference_duration_seconds_count")
        assert 0 < runs <= model_requests
        for histogram in ("onnx_serve_batch_rows", "onnx_serve_batch_requests"):
            assert value(samples, f"{histogram}_count") == value(samples, f"{histogram}_bucket", le="+Inf") == runs
        assert value(samples, "onnx_serve_batch_rows_bucket", le="1.0") <= runs
        assert value(samples, "onnx_serve_queue_depth") == 0

        digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
        assert value(samples, "onnx_serve_model_info", name="demo", generation="", sha256=digest) == 1
        assert value(samples, "onnx_serve_model_bytes") == demo_model.stat().st_size
        assert 0 < value(samples, "onnx_serve_model_load_seconds") < 60


@pytest.mark.slow
def test_a_killed_workers_counts_stay_and_its_replacement_adds_to_them(demo_model, tmp_path, multiproc_dir):
    metrics_port = free_port()
    env = dict(WEB_CONCURRENCY="2", METRICS_PORT=str(metrics_port), PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir))
    with run_service(str(demo_model), tmp_path, **env) as service:
        first = wait_for_models(service, multiproc_dir)
        sent, _ = send(service.url, predictions(40))
        scrape_when_counted(metrics_port, dict(sent))
        served = served_by_each_worker(multiproc_dir)

        # Killed outright (as by the OOM killer): what it had written stays counted, its live gauges go.
        victim = max(first, key=lambda pid: served.get(pid, 0))
        assert served[victim] > 0
        os.kill(victim, signal.SIGKILL)
        second = wait_for_models(service, multiproc_dir, replacing=[victim])
        assert not list(multiproc_dir.glob(f"gauge_livemax_{victim}.db"))
        samples = scrape(metrics_port)
        assert requests_by_route(samples) == sent
        assert value(samples, "onnx_serve_batch_requests_sum") == sent["/predict", "200"]
        digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
        assert value(samples, "onnx_serve_model_info", name="demo", generation="", sha256=digest) == 1

        sent += send(service.url, predictions(30))[0]
        scrape_when_counted(metrics_port, dict(sent))
        assert set(served_by_each_worker(multiproc_dir)) == {*first, *second}


@pytest.mark.slow
def test_a_stopping_worker_writes_its_last_counts(demo_model, tmp_path, multiproc_dir):
    # Counts wait up to a minute in the worker: only the write at exit can bring them to the scrape in time.
    metrics_port = free_port()
    env = dict(WEB_CONCURRENCY="2", METRICS_PORT=str(metrics_port), PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
               METRICS_FLUSH_SECONDS="60")  # fmt: skip
    with run_service(str(demo_model), tmp_path, **env) as service:
        first = wait_for_models(service, multiproc_dir)
        sent, _ = send(service.url, predictions(30))
        time.sleep(0.5)
        assert requests_by_route(scrape(metrics_port)) == {}
        for pid in first:
            os.kill(pid, signal.SIGTERM)  # gunicorn replaces them, as after max_requests
        wait_for_models(service, multiproc_dir, replacing=first)
        samples = scrape(metrics_port)
        assert requests_by_route(samples) == sent
        assert value(samples, "onnx_serve_batch_requests_sum") == sent["/predict", "200"] > 0


def test_metrics_port_0_opens_no_port(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path, WEB_CONCURRENCY="2", METRICS_PORT="0") as service:
        service.wait_state("ready")
        wait_for(lambda: len(workers(service)) == 2, 30, what="2 workers")
        for pid in [service.process.pid, *workers(service)]:
            assert listening_ports(pid) == {service.port}
        assert httpx.get(service.url + "/metrics").status_code == 404


def test_a_private_directory_is_made_and_removed_when_none_is_given(demo_model, tmp_path):
    metrics_port = free_port()
    env = {"METRICS_PORT": str(metrics_port)}
    with run_service(str(demo_model), tmp_path, **env) as service:
        service.wait_state("ready")
        worker = wait_for(lambda: workers(service), 30, what="the worker")[0]
        # The worker maps its metrics files: the directory the master made for it.
        maps = Path(f"/proc/{worker}/maps").read_text().split()
        directory = Path(next(path for path in maps if "/onnx-serve-metrics-" in path)).parent
        assert directory.parent == Path("/dev/shm")
        assert service.predict({"inputs": [ROW]}).status_code == 200
        scrape_when_counted(metrics_port, {("/predict", "200"): 1}, skip=("/health",))
        assert list(directory.glob("counter_*.db"))
    assert service.process.returncode == 0
    assert not directory.exists()


@pytest.mark.parametrize(
    "value, fragment",
    [("ninety", "METRICS_PORT: Input should be a valid integer"), ("70000", "METRICS_PORT: "),
     ("same", "METRICS_PORT must differ from PORT"), ("taken", "METRICS_PORT")],
)  # fmt: skip
def test_a_bad_metrics_port_stops_start_up_and_names_the_variable(value, fragment, demo_model, tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        given = {"same": str(port), "taken": str(taken.getsockname()[1])}.get(value, value)
        env = service_env(str(demo_model), port, METRICS_PORT=given)
        process = subprocess.Popen(GUNICORN, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)  # fmt: skip
        try:
            output = process.communicate(timeout=60)[0]
        finally:
            stop(process)  # and its workers, had it started any
    assert process.returncode == 2, output[-2000:]
    assert fragment in output
    assert "Traceback" not in output


# --- the worker's recorder, in-process ----------------------------------------------------------------------------


def test_recorded_values_equal_what_prometheus_client_computes_itself():
    """The recorder's batched writes against the library's own observe(), inc() and set(), sample by sample."""
    recorded, reference = metrics.make_families(), metrics.make_families()
    recorder = metrics.Recorder(0.05, ["/predict", "/health", *metrics.INFER_ROUTES], recorded)
    requests = [
        ("/predict", 200, 0.0005), ("/predict", 200, 0.0004), ("/v2/models/m/infer", 400, 30.0),
        ("/v2/models/m/versions/3/infer", 200, 31.0), ("/wp-admin", 404, 0.001), ("/predict/", 307, 0.0),
        ("/v2/models/m/extra/infer", 404, 2.5), ("/health", 503, 0.01),
    ]  # fmt: skip
    routes = ["/predict", "/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
              "other", "other", "other", "/health"]  # fmt: skip
    batches = [(1, 1, 0.0001), (64, 5, 0.25), (65536, 2, 10.0), (70000, 1, 40.0)]

    async def record() -> None:
        for path, status, seconds in requests:
            recorder.request(path, status, seconds)
        for rows, count, seconds in batches:
            recorder.batch(rows, count, seconds)
        recorder.watch_queue(types.SimpleNamespace(depth=3))  # a scheduler with three requests queued
        assert recorder.flush_armed and recorded["requests"].collect()[0].samples == []  # not written yet
        await asyncio.sleep(0.2)
        assert not recorder.flush_armed

    asyncio.run(record())
    for (path, status, seconds), route in zip(requests, routes):
        reference["requests"].labels(route, status).inc()
        reference["request_duration_seconds"].labels(route).observe(seconds)
    for rows, count, seconds in batches:
        reference["inference_duration_seconds"].observe(seconds)
        reference["batch_rows"].observe(rows)
        reference["batch_requests"].observe(count)
    reference["queue_depth"].set(3)

    def samples(family) -> set:
        return {(s.name, tuple(sorted(s.labels.items())), s.value) for s in family.collect()[0].samples
                if not s.name.endswith("_created")}  # fmt: skip

    for name in ("requests", "request_duration_seconds", "inference_duration_seconds", "batch_rows",
                 "batch_requests", "queue_depth"):  # fmt: skip
        assert samples(recorded[name]) == samples(reference[name]), name
        assert samples(recorded[name])
