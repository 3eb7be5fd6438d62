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

from bench import coldstart, external_memory, image, large_request, network_start, throughput, venvs
from bench.loadgen import DESCRIPTION as LOADGEN
from bench.report import Figure, LoadRow, floors, side_by_side, table, write_json
from bench.servers import FLOOR_APP, SEED_FASTAPI_APP, SERVICE_APP, gunicorn, litserve
from bench import CACHE
from tests.support.models import DEMO_MODEL, ROOT, large_model, mlp_model
from tests.support.storage_emulator import storage_emulator

RESULTS = ROOT / "bench" / "results" / "latest.json"
WORK = CACHE
BUCKET = "bench"
CONCURRENCY = (1, 8, 64)
LARGE_ROWS = 10_000
# What issue 9 asks of the service, as ratios to the floor in the same run: {(model key, clients): bound}. At
# every model and concurrency it must also answer more requests/s than each peer, with no errors.
RPS_TARGETS = {("demo", 1): 0.8, ("demo", 8): 0.8, ("demo", 64): 1.0, ("mlp", 64): 2.0}
P99_TARGETS = {("demo", 1): 1.5, ("demo", 8): 1.5}
FLOOR, SERVICE, SEED_FASTAPI, LITSERVE = "floor", "service", "FastAPI (seed)", "LitServe"
PEERS = (SEED_FASTAPI, LITSERVE)
LITSERVE_MAX_BATCH_SIZE = 64
# The best of 0.001, 0.005 and 0.01 s measured with `python -m bench.litserve_timeout` (docs/benchmarks.md).
LITSERVE_BATCH_TIMEOUT = 0.001
# A single-threaded load generator near one full core is the bottleneck: its figures then understate the server.
LOADGEN_SATURATED = 0.8
# Other processes using more than this many cores during a run make its figures noisy (said under the table).
NOISY_OTHERS = 0.5


@dataclass(frozen=True)
class Plan:
    start_reps: int  # cold starts of each model, service and floor alike
    load_seconds: float  # each load run, after its warm-up
    load_warmup: float
    load_reps: int  # load runs per concurrency, per server
    large_reps: int  # timed large requests, service and floor alike
    serve_requests: int  # predictions served after loading, before reading the worker's peak RSS
    network_reps: int  # cold starts through the bandwidth-capping stand-in, of each model and each way


FULL = Plan(start_reps=5, load_seconds=5, load_warmup=1, load_reps=3, large_reps=20, serve_requests=5, network_reps=3)
QUICK = Plan(start_reps=1, load_seconds=1.5, load_warmup=0.5, load_reps=1, large_reps=3, serve_requests=2,
             network_reps=1)


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


DEMO = Model("demo", "demo model", DEMO_MODEL, "features", 4)


def models() -> list[Model]:
    """The demo model and ONNX models of about 50 and 200 MB, made once and kept under .cache/bench."""
    made = [DEMO]
    for megabytes in (50, 200):
        path = WORK / "models" / f"large-{megabytes}mb.onnx"
        if not path.is_file():
            large_model(path, megabytes)
        made.append(Model(f"{megabytes}mb", f"{megabytes} MB model", path, "features", 64))
    return made


def mlp() -> Model:
    """The mid-size MLP (256 -> 1024 -> 1024 -> 16, about 5 MB), made once and kept under .cache/bench."""
    path = WORK / "models" / "mlp-256-1024-1024-16.onnx"
    if not path.is_file():
        mlp_model(path)
    return Model("mlp", "MLP", path, "features", 256)


def run(quick: bool, out: Path = RESULTS, progress: Callable[[str], None] = print) -> list[Figure]:
    plan = QUICK if quick else FULL
    logs = WORK / "run"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    context = {"machine": machine(), "quick": quick, "plan": plan.__dict__, "load_generator": LOADGEN}
    host = context["machine"]
    progress(f"machine: {host['cpus']} CPUs, {host['cpu_model']}; {'quick' if quick else 'full'} run")
    progress(f"load generator: {LOADGEN}")
    progress(f"load average before: {' '.join(f'{x:.2f}' for x in host['load_average_before'])}")
    litserve_python = venvs.litserve_python(progress)
    figures: list[Figure] = []
    all_models = models()
    with storage_emulator(log_path=logs / "emulator.log") as emulator:
        for model in all_models:
            emulator.upload(BUCKET, model.path.name, model.path)
        figures += start_figures(all_models, emulator.env, logs, plan, progress)
    rows, runtimes = load_rows([DEMO, mlp()], litserve_python, logs, plan, progress)
    figures += large_request_figures(logs, plan, progress)
    figures += external_memory.figures(WORK, logs, 256 if quick else 1024, plan.serve_requests, progress)
    network_figures, network_table = network_start.figures(WORK, logs, 64 if quick else 1024, plan.network_reps, progress)
    figures += network_figures
    figures += image_figures()
    host["load_average_after"] = os.getloadavg()
    context.update(runtimes=runtimes, litserve={
        "python": str(litserve_python), "max_batch_size": LITSERVE_MAX_BATCH_SIZE,
        "batch_timeout": LITSERVE_BATCH_TIMEOUT,
    })  # fmt: skip
    write_json(out, figures, rows, context)
    progress(
        "\n" + table(figures) + "\n\nFloors:\n" + floors(figures) + "\n\nThroughput and latency of POST /predict, "
        "side by side (one worker each, one row per request):\n\n" + side_by_side(rows) + "\n\n"
        + load_notes(rows, runtimes) + "\n\nCold start at the network's speed (issue 17):\n\n" + network_table + "\n\n"
        + repetitions(plan)
        + f"\nLoad average before {host['load_average_before'][0]:.2f}, after {host['load_average_after'][0]:.2f} "
        "(1 min)."
    )  # fmt: skip
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


def load_rows(
    load_models: list[Model], litserve_python: Path, logs: Path, plan: Plan, progress
) -> tuple[list[LoadRow], dict[str, str]]:
    """The side-by-side table's rows: every server at every concurrency on every model, and each server's event
    loop and HTTP parser."""
    progress(
        f"throughput: {plan.load_reps} runs of {plan.load_seconds:g} s (after {plan.load_warmup:g} s warm-up) per "
        f"model, concurrency and server, medians; LitServe runs only in its own turns"
    )
    rows: list[LoadRow] = []
    runtimes: dict[str, str] = {}
    for model in load_models:
        path = model.path
        starters = {
            FLOOR: lambda: gunicorn(FLOOR_APP, str(path), logs),
            SERVICE: lambda: gunicorn(SERVICE_APP, str(path), logs),
            SEED_FASTAPI: lambda: gunicorn(SEED_FASTAPI_APP, str(path), logs),
            LITSERVE: lambda: litserve(litserve_python, path, logs, LITSERVE_MAX_BATCH_SIZE, LITSERVE_BATCH_TIMEOUT),
        }
        progress(f"  {model.label}:")
        got, model_runtimes = throughput.measure(
            starters, model.body(), CONCURRENCY, plan.load_seconds, plan.load_warmup, plan.load_reps, progress,
            alone=(LITSERVE,),
        )
        for name, runtime in model_runtimes.items():  # one entry per server, unless the models disagree
            runtimes[name] = runtime if runtimes.get(name, runtime) == runtime else f"{runtimes[name]}; {runtime}"
        for clients in CONCURRENCY:
            floor = got[FLOOR, clients]
            for name in starters:
                ours = got[name, clients]
                row = LoadRow(model.label, clients, name, ours.requests_per_second, ours.p50, ours.p99, ours.errors,
                              ours.server_cpu_share, ours.loadgen_cpu_share, ours.others_cpu_share,
                              floor.requests_per_second, floor.p99)  # fmt: skip
                if name == SERVICE:
                    judge_service(row, model.key, [got[peer, clients] for peer in PEERS])
                rows.append(row)
    return rows, runtimes


def judge_service(row: LoadRow, model_key: str, peers: list[throughput.LoadFigures]) -> None:
    """Fill the service row's targets and what it misses of them."""
    rps_bound, p99_bound = RPS_TARGETS.get((model_key, row.clients)), P99_TARGETS.get((model_key, row.clients))
    if rps_bound is not None:
        row.targets.append(f"req/s >= {rps_bound:g}x")
        if row.rps_ratio < rps_bound:
            row.misses.append(f"req/s {_beside(row.rps_ratio, rps_bound)}x")
    if p99_bound is not None:
        row.targets.append(f"p99 <= {p99_bound:g}x")
        if row.p99_ratio > p99_bound:
            row.misses.append(f"p99 {_beside(row.p99_ratio, p99_bound)}x")
    row.targets += ["more req/s than peers", "0 errors"]
    for name, peer in zip(PEERS, peers):
        if row.requests_per_second <= peer.requests_per_second:
            row.misses.append(f"slower than {name}")
    if row.errors:
        row.misses.append(f"{row.errors} errors")


def _beside(ratio: float, bound: float) -> str:
    """The ratio to two decimals, or three where two would read as the bound it missed (1.503 against 1.5)."""
    return f"{ratio:.2f}" if f"{ratio:.2f}" != f"{bound:.2f}" else f"{ratio:.3f}"


def load_notes(rows: list[LoadRow], runtimes: dict[str, str]) -> str:
    busiest = max(rows, key=lambda r: r.loadgen_cpu_share)
    clients = f"{busiest.clients} client{'s' if busiest.clients > 1 else ''}"
    share = f"{busiest.loadgen_cpu_share:.0%} of one core ({busiest.server}, {busiest.model}, {clients})"
    if busiest.loadgen_cpu_share >= LOADGEN_SATURATED:
        loadgen = f"NEAR SATURATION: up to {share}; rows near that understate the server"
    else:
        loadgen = f"at most {share}: not the bottleneck, though it shares the cores with the server"
    noisy = sum(r.others_cpu_share > NOISY_OTHERS for r in rows)
    return "\n".join([
        "- event loop + HTTP parser, as each server logged them: "
        + "; ".join(f"{name} {runtime}" for name, runtime in runtimes.items()),
        "- floor: bench/floor_app.py, a bare ASGI app running the service's session inline; service, floor and "
        "FastAPI (seed) under the service's gunicorn config and Uvicorn worker",
        "- FastAPI (seed): bench/peers/seed_fastapi.py (pydantic request model, `def` endpoint calling session.run), "
        "from the service's own environment",
        f"- LitServe: {venvs.LITSERVE} from its own environment ({venvs.VENVS}/litserve), "
        f"max_batch_size {LITSERVE_MAX_BATCH_SIZE}, batch_timeout {LITSERVE_BATCH_TIMEOUT:g} s, one inference "
        "worker, one HTTP server (bench/peers/litserve_app.py)",
        f"- load generator: {loadgen}",
        f"- CPU columns: cores used while the load ran (of the machine's {len(os.sched_getaffinity(0))}), by the "
        "server's processes, the load generator and every other process (other people's work on a shared machine): "
        f"others used {min(r.others_cpu_share for r in rows):.2f}-{max(r.others_cpu_share for r in rows):.2f}"
        + (f"; {noisy} of {len(rows)} rows ran beside more than {NOISY_OTHERS:g} core of other work: read them with care "
           "(a server with more busy threads or processes then gets a larger share of the cores)" if noisy else ""),
        "- req per server CPU-s: requests/s over the server's CPU share, what a request costs the server; it holds "
        "up better than req/s when other work takes the cores",
    ])


def large_request_figures(logs: Path, plan: Plan, progress) -> list[Figure]:
    progress(f"large request: {LARGE_ROWS:,} rows of the demo model, {plan.large_reps} runs each, medians")
    values = large_request.rows(LARGE_ROWS, DEMO.features)
    body = large_request.rows_body(DEMO.input_name, LARGE_ROWS, DEMO.features)
    outputs = [output.name for output in onnxruntime.InferenceSession(str(DEMO.path)).get_outputs()]
    v2 = {binary: large_request.v2_request(DEMO.path.stem, DEMO.input_name, values, outputs, binary)
          for binary in (False, True)}  # fmt: skip
    v2_seconds: dict[bool, list[float] | str] = {}
    with gunicorn(SERVICE_APP, str(DEMO_MODEL), logs) as service:
        service.wait_ready()
        ours = large_request.service_seconds(service.port, body, plan.large_reps)
        for binary, request in v2.items():
            try:
                v2_seconds[binary] = large_request.service_seconds(
                    service.port, request.body, plan.large_reps, request.path, request.headers, request.check
                )
            except large_request.RouteMissing:
                v2_seconds[binary] = "not measured: route answers 404"
    bare = large_request.floor_seconds(DEMO_MODEL, body, plan.large_reps)
    native = statistics.median(ours)
    figures = [Figure(
        "large_request_10k", f"one request of {LARGE_ROWS:,} rows", "ms", native, statistics.median(bare),
        "large request: orjson.loads of the same body, np.asarray and session.run in-process", "<= 2",
        note=f"body {len(body) / 2**20:.2f} MB",
    )]  # fmt: skip
    for binary, label, target in ((False, "V2 JSON", ""), (True, "V2 binary", "< 1")):
        seconds = v2_seconds[binary]
        measured = not isinstance(seconds, str)
        figures.append(Figure(
            f"large_request_10k_v2_{'binary' if binary else 'json'}", f"one request of {LARGE_ROWS:,} rows, {label}",
            "ms", statistics.median(seconds) if measured else None, native,
            "V2 requests: the same rows as native JSON to POST /predict, measured in the same run", target,
            note=f"body {len(v2[binary].body) / 2**20:.2f} MB" if measured else seconds,
        ))  # fmt: skip
    return figures


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
        f"load runs of {plan.load_seconds:g} s per model, concurrency and server, {plan.large_reps} large requests each."
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
