"""Run every benchmark, print the table and write the figures as JSON: what `invoke bench` does."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnxruntime

from bench import coldstart, image, large_request, throughput
from bench.loadgen import DESCRIPTION as LOADGEN
from bench.report import Figure, floors, table, write_json
from bench.servers import FLOOR_APP, SERVICE_APP, gunicorn
from tests.support.models import DEMO_MODEL, ROOT, large_model
from tests.support.storage_emulator import storage_emulator

RESULTS = ROOT / "bench" / "results" / "latest.json"
WORK = ROOT / ".cache" / "bench"
BUCKET = "bench"
CONCURRENCY = (1, 8, 64)
LARGE_ROWS = 10_000


@dataclass(frozen=True)
class Plan:
    start_reps: int  # cold starts of each model, service and floor alike
    load_seconds: float  # each load run, after its warm-up
    load_warmup: float
    load_reps: int  # load runs per concurrency, per server
    large_reps: int  # timed large requests, service and floor alike
    serve_requests: int  # predictions served after loading, before reading the worker's peak RSS


FULL = Plan(start_reps=5, load_seconds=10, load_warmup=1, load_reps=3, large_reps=20, serve_requests=5)
QUICK = Plan(start_reps=1, load_seconds=2, load_warmup=0.5, load_reps=1, large_reps=3, serve_requests=2)


@dataclass(frozen=True)
class Model:
    key: str  # in figure keys: ready_<key>
    label: str
    path: Path
    input_name: str
    features: int  # width of the single input

    @property
    def uri(self) -> str:
        return f"gs://{BUCKET}/{self.path.name}"

    def body(self) -> bytes:
        return large_request.rows_body(self.input_name, 1, self.features)


def models() -> list[Model]:
    """The demo model and ONNX models of about 50 and 200 MB, made once and kept under .cache/bench."""
    made = [Model("demo", "demo model", DEMO_MODEL, "features", 4)]
    for megabytes in (50, 200):
        path = WORK / "models" / f"large-{megabytes}mb.onnx"
        if not path.is_file():
            large_model(path, megabytes)
        made.append(Model(f"{megabytes}mb", f"{megabytes} MB model", path, "features", 64))
    return made


def run(quick: bool, out: Path = RESULTS, progress: Callable[[str], None] = print) -> list[Figure]:
    plan = QUICK if quick else FULL
    logs = WORK / "run"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    context = {"machine": machine(), "quick": quick, "plan": plan.__dict__, "load_generator": LOADGEN}
    host = context["machine"]
    progress(f"machine: {host['cpus']} CPUs, {host['cpu_model']}; {'quick' if quick else 'full'} run")
    progress(f"load generator: {LOADGEN}")
    figures: list[Figure] = []
    all_models = models()
    with storage_emulator(log_path=logs / "emulator.log") as emulator:
        for model in all_models:
            emulator.upload(BUCKET, model.path.name, model.path)
        figures += start_figures(all_models, emulator.env, logs, plan, progress)
    figures += load_figures(logs, plan, progress)
    figures += large_request_figures(logs, plan, progress)
    figures += image_figures()
    context["machine"]["load_average_after"] = os.getloadavg()
    write_json(out, figures, context)
    progress("\n" + table(figures) + "\n\nFloors:\n" + floors(figures) + "\n" + repetitions(plan))
    progress(f"\nwrote {out}")
    return figures


def start_figures(models: list[Model], storage: dict[str, str], logs: Path, plan: Plan, progress) -> list[Figure]:
    progress(f"cold start: {plan.start_reps} runs of each model, service and floor alternating")
    figures = []
    floor_env = {**os.environ, **storage}
    rss: dict[str, int] = {}
    for model in models:
        starts, floor_times = [], []
        for rep in range(plan.start_reps):
            service_first = rep % 2 == 1
            if not service_first:
                floor_times.append(coldstart.floor_start(model.uri, floor_env, logs))
            starts.append(coldstart.service_start(model.uri, storage, logs, model.body(), plan.serve_requests))
            if service_first:
                floor_times.append(coldstart.floor_start(model.uri, floor_env, logs))
            progress(
                f"  {model.label} run {rep + 1}/{plan.start_reps}: first /health {starts[-1].first_answer:.2f} s, "
                f"ready {starts[-1].ready:.2f} s, floor {floor_times[-1]:.2f} s, "
                f"peak RSS {starts[-1].peak_rss / 2**20:.0f} MB"
            )
        ready = statistics.median(s.ready for s in starts)
        first = statistics.median(s.first_answer for s in starts)
        rss[model.key] = int(statistics.median(s.peak_rss for s in starts))
        is_target = model.key == "200mb"
        figures.append(Figure(
            f"ready_{model.key}", f"time to ready, {model.label}", "s", ready, statistics.median(floor_times),
            "time to ready: a bare Python process that imports onnxruntime and google-cloud-storage, downloads the "
            "same object from the same emulator and opens a session (bench/floor_start.py)",
            "<= 1.3" if is_target else "",
        ))  # fmt: skip
        figures.append(Figure(
            f"first_health_{model.key}", f"first /health answered, {model.label}", "s", first, ready,
            "first /health: the service's own time to ready for the same model", "< 0.5" if is_target else "",
        ))  # fmt: skip
    large = next(m for m in models if m.key == "200mb")
    figures.append(Figure(
        "peak_rss_200mb", "worker peak RSS, 200 MB model", "MB", rss["200mb"], rss["demo"] + large.path.stat().st_size,
        "peak RSS: the worker's peak RSS serving the demo model (the empty service) plus the model file's size",
        "<= 1.5", note=f"VmHWM of the worker after loading and {plan.serve_requests} predictions",
    ))  # fmt: skip
    return figures


def load_figures(logs: Path, plan: Plan, progress) -> list[Figure]:
    progress(
        f"throughput: demo model, {plan.load_reps} runs of {plan.load_seconds:g} s (after {plan.load_warmup:g} s "
        f"warm-up) per concurrency and server, medians"
    )
    body = large_request.rows_body("features", 1, 4)
    uri = str(DEMO_MODEL)
    with gunicorn(SERVICE_APP, uri, logs) as service, gunicorn(FLOOR_APP, uri, logs) as floor:
        service.wait_ready()
        floor.wait_ready()
        ports = {"service": service.port, "floor": floor.port}
        figures = []
        floor_label = (
            "predict: a bare ASGI app (bench/floor_app.py) under the same gunicorn config and Uvicorn worker, "
            "running the same session on the same input"
        )
        for clients in CONCURRENCY:
            got = throughput.measure(ports, body, clients, plan.load_seconds, plan.load_warmup, plan.load_reps, progress)
            ours, bare = got["service"], got["floor"]
            name = f"predict, {clients} client{'s' if clients > 1 else ''}"
            figures += [
                Figure(f"predict_c{clients}_rps", f"{name}: throughput", "req/s", ours.requests_per_second,
                       bare.requests_per_second, floor_label, ">= 0.6"),
                Figure(f"predict_c{clients}_p50", f"{name}: p50 latency", "ms", ours.p50, bare.p50, floor_label),
                Figure(f"predict_c{clients}_p99", f"{name}: p99 latency", "ms", ours.p99, bare.p99, floor_label, "<= 2"),
                Figure(f"predict_c{clients}_errors", f"{name}: errors", "", ours.errors, None, "", "== 0",
                       note=f"floor errors: {bare.errors}"),
            ]  # fmt: skip
    return figures


def large_request_figures(logs: Path, plan: Plan, progress) -> list[Figure]:
    progress(f"large request: {LARGE_ROWS:,} rows of the demo model, {plan.large_reps} runs each, medians")
    body = large_request.rows_body("features", LARGE_ROWS, 4)
    with gunicorn(SERVICE_APP, str(DEMO_MODEL), logs) as service:
        service.wait_ready()
        ours = large_request.service_seconds(service.port, body, plan.large_reps)
    bare = large_request.floor_seconds(DEMO_MODEL, body, plan.large_reps)
    return [Figure(
        "large_request_10k", f"one request of {LARGE_ROWS:,} rows", "ms", statistics.median(ours),
        statistics.median(bare),
        "large request: orjson.loads of the same body, np.asarray and session.run in-process", "<= 2",
        note=f"body {len(body) / 2**20:.2f} MB",
    )]  # fmt: skip


def image_figures() -> list[Figure]:
    sizes = image.read_sizes()
    note = f"from {image.RESULTS.relative_to(ROOT)}" if sizes else image.NOT_MEASURED
    return [
        Figure("image_bytes", "image size", "MB", sizes and sizes.image, note=note),
        Figure("image_over_base_bytes", "image size over its base", "MB", sizes and sizes.over_base,
               sizes and sizes.installed,
               "image: the installed size of the runtime requirements (requirements.txt), from the container tests",
               "<= 1.1", note=note),
    ]  # fmt: skip


def repetitions(plan: Plan) -> str:
    return (
        f"Medians of {plan.start_reps} cold starts per model (service and floor alternating), {plan.load_reps} "
        f"load runs of {plan.load_seconds:g} s per concurrency and server, {plan.large_reps} large requests each."
    )


def machine() -> dict:
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_bytes": int(memory.split()[1]) * 1024,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
