"""`invoke tune`: measure what one instance of each shape serves, recommend the settings, and print the price.

For each shape the real image runs under Docker with the shape's CPU quota and memory limit (`--cpu-quota` over a
100 ms period, or Fly's 80 ms period and shared baseline quota), the user's model mounted read-only; a closed-loop load generator
(bench/loadgen.py, in a child process pinned to the CPUs the container leaves free) sweeps concurrency 1, 2, 4, ...
on /predict until throughput stops growing or p99 passes the objective. `--url` sweeps a deployed service instead.
The rules that turn a sweep into settings are in sizing.py, the prices in prices.py, the file edits in
tune_write.py and the picture in tune_plot.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import json as json_lib  # `tune` has a --json flag, which hides the module's name there
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from invoke import Context, Exit, task

from toolkit import compare, prices, sizing, smoke
from toolkit import image as docker_image
from toolkit.sizing import Shape, Step

ROOT = Path(__file__).resolve().parent.parent
LABEL = "org.onnx-serve.tune"  # on every container tune starts, so that none is ever left behind unnoticed
MOUNT = "/models"
GROWTH = 0.05  # two steps in a row that add less than 5% throughput over the best so far end the sweep
PATIENCE = 2  # (one such step may be noise on a busy machine)
SATURATED = 0.9  # the load generator used 90% of its CPU: its figure is a lower bound
SAMPLE_EVERY = 0.2  # seconds between the container's CPU and memory readings
UNCONFINED = "this machine as it is: no Docker, no cgroup, so no CPU quota or memory limit"
URL_WAIT = 20.0  # seconds --url waits for the service to answer /health with the model loaded


class TuneError(Exception):
    """Input or a situation tune cannot measure; the message names the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Plan:
    target: str
    shapes: list[Shape]
    p99_ms: float
    step_seconds: float
    warmup_seconds: float
    max_concurrency: int
    levels: list[int]  # fixed concurrencies to measure, instead of the doubling sweep
    image: str = ""
    unconfined: bool = False  # no Docker, no cgroup: this machine as it is, said on every line
    headers: dict[str, str] = field(default_factory=dict)


def parse_levels(text: Any) -> list[int]:
    if text in (None, "", 0):
        return []
    try:
        levels = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise TuneError(f"--levels {text!r}: give concurrencies as whole numbers, e.g. 1,4,16") from None
    if any(level < 1 for level in levels):
        raise TuneError(f"--levels {text!r}: every concurrency must be 1 or more")
    return levels


def positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TuneError(f"{name} is {value!r}, not a number") from None
    if not number > 0 or not math.isfinite(number):
        raise TuneError(f"{name} is {value!r}: give a number above 0")
    return number


def concurrencies(plan: Plan) -> list[int]:
    if plan.levels:
        return plan.levels
    levels, level = [], 1
    while level <= plan.max_concurrency:
        levels.append(level)
        level *= 2
    return levels


# ---------------------------------------------------------------------------------------------------------------
# The model and the request bodies, prepared once for every shape


@dataclass
class Model:
    uri: str
    sha256: str
    folder: Path  # mounted read-only at MOUNT
    file_name: str
    bodies: list[dict]
    metadata: dict


def prepare_model(uri: str, sha256: str, samples: str, cache_dir: Path) -> Model:
    """Fetch and load the model as the service does (a model it would refuse fails here, before any container), and
    check the request bodies on it: the user's samples, or the seeded ones `model.compare` makes."""
    local = Path(uri) if not uri.startswith("gs://") else None
    if local is not None and not local.is_absolute() and not local.is_file():
        local = ROOT / uri
    try:
        loaded = compare.load_model("model", str(local or uri), sha256, "", cache_dir)
        bodies = compare.read_samples(samples) if samples else compare.seeded_requests(
            loaded, loaded, compare.SEEDED_REQUESTS, compare.SEED)
    except compare.CompareError as exc:
        raise TuneError(f"{exc}; fix the model (check it with `invoke model.compare`) or give another --model") from None
    if refused := compare.first_refused(loaded, bodies):
        number, exc = refused
        raise TuneError(f"the model refuses request {number} of {samples or 'the seeded requests'}: {exc}; give "
                        "--samples with /predict bodies this model takes (its /metadata lists the inputs)")
    status = loaded.store.status
    path = local.resolve() if local else _downloaded(cache_dir, uri)
    folder = stage(path, [f["name"] for f in status.data_files], cache_dir / "mounted")
    return Model(uri, status.sha256, folder, path.name, bodies, loaded.store.metadata())


def _downloaded(cache_dir: Path, uri: str) -> Path:
    name = uri.split("#", 1)[0].rsplit("/", 1)[-1]
    found = sorted(cache_dir.rglob(name))
    if not found:
        raise TuneError(f"the download of {uri} left no {name} under {cache_dir}")
    return found[0]


def stage(path: Path, data_files: list[str], folder: Path) -> Path:
    """The model (and its external data files) in a folder of its own, under the run's temporary folder, that the
    image's unprivileged user may read: hard links to files others may read already, else copies. The model's own
    folder may be private (mode 0700), and so is the temporary folder until now."""
    folder.mkdir(parents=True)
    for name in [path.name, *data_files]:
        source, target = path.parent / name, folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not source.stat().st_mode & 0o004:
                raise PermissionError("others may not read it")
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
            target.chmod(0o644)
    for directory in [folder.parent, folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# CPUs: the container's and the load generator's


@dataclass(frozen=True)
class Placement:
    container_cpus: list[int]
    loadgen_cpus: list[int]
    quota_cpus: float  # what the container gets, capped at this machine's CPUs
    capped: bool  # the shape has more CPU than this machine
    shared: bool  # no CPU was left for the load generator

    def notes(self, shape: Shape) -> list[str]:
        found = []
        if self.capped:
            found.append(f"{shape.name} has {shape.quota_cpus:g} CPUs and this machine {len(self.container_cpus)}: "
                         f"measured on {self.quota_cpus:g}")
        if self.shared:
            found.append("no CPU was left for the load generator: it shared the container's CPUs, so every figure "
                         "is a lower bound")
        return found


def place(shape: Shape, cpus: list[int]) -> Placement:
    """The container on as few CPUs as its quota and thread count need, the load generator on the rest."""
    quota = min(shape.quota_cpus, float(len(cpus)))
    needed = max(1, math.ceil(quota))
    threads = max(needed, min(shape.vcpus, len(cpus) - 1))
    if threads < len(cpus):
        return Placement(cpus[:threads], cpus[threads:], quota, shape.quota_cpus > len(cpus), False)
    return Placement(cpus, cpus, quota, shape.quota_cpus > len(cpus), True)


# ---------------------------------------------------------------------------------------------------------------
# The container


class Containers:
    """Every container tune starts, by name; `remove_all` runs on every exit path (Ctrl-C included)."""

    def __init__(self, run_id: str):
        self.run_id, self.names = run_id, []

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise TuneError(f"`docker {shlex.join(args)}` failed: {done.stderr.strip()[-1500:]}")
        return done

    def start(self, plan: Plan, model: Model, shape: Shape, placement: Placement, port: int, network: str) -> str:
        name = f"onnx-serve-tune-{self.run_id}-{len(self.names)}"
        self.names.append(name)  # before `docker run`: an interrupt during it still removes the container
        limits = ["--cpuset-cpus", ",".join(map(str, placement.container_cpus)),
                  "--memory", str(shape.memory_bytes), "--memory-swap", str(shape.memory_bytes),
                  # all its CPUs while the model loads (the platforms boost start-up); the shape's quota after
                  "--cpu-period", str(shape.cpu_period_us),
                  "--cpu-quota", str(len(placement.container_cpus) * shape.cpu_period_us)]  # fmt: skip
        env = {"MODEL_URI": f"{MOUNT}/{model.file_name}", "MODEL_SHA256": model.sha256, "WEB_CONCURRENCY": "1",
               "ORT_INTRA_OP_THREADS": str(len(placement.container_cpus)), "METRICS_PORT": "0"}  # fmt: skip
        if network == "host":
            env.update(HOST="127.0.0.1", PORT=str(port))
            net = ["--network", "host"]
        else:
            net = ["--publish", f"127.0.0.1:{port}:8080"]
        command = ["run", "--detach", "--name", name, "--label", f"{LABEL}={self.run_id}", *net, *limits,
                   "--read-only", "--tmpfs", "/tmp", "--volume", f"{model.folder}:{MOUNT}:ro"]  # fmt: skip
        for key, value in env.items():
            command += ["--env", f"{key}={value}"]
        self.docker(*command, plan.image)
        return name

    def limit(self, name: str, shape: Shape, placement: Placement) -> None:
        """The shape's sustained CPU quota, set once the model is loaded (the platforms boost start-up)."""
        quota = round(placement.quota_cpus * shape.cpu_period_us)
        self.docker("update", "--cpu-period", str(shape.cpu_period_us), "--cpu-quota", str(quota), name)

    def pid(self, name: str) -> int:
        return int(self.docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip() or 0)

    def state(self, name: str) -> dict[str, Any]:
        done = self.docker("inspect", "--format", "{{json .State}}", name, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def logs(self, name: str) -> str:
        done = self.docker("logs", "--tail", "30", name, check=False)
        return (done.stdout + done.stderr).strip()

    def remove(self, name: str) -> None:
        self.docker("rm", "--force", name, check=False)
        with contextlib.suppress(ValueError):
            self.names.remove(name)

    def remove_all(self) -> None:
        """Every container of this run, by name and by label: an interrupt during `docker run` may leave the engine
        creating one after its name was removed."""
        for name in list(self.names):
            self.remove(name)
        labelled = self.docker("ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.run_id}", check=False)
        for container in labelled.stdout.split():
            self.docker("rm", "--force", container, check=False)


def bridge_network() -> bool:
    """Engines without a bridge (the tests' private dockerd) run the container on the host's network instead,
    listening on 127.0.0.1 only."""
    return subprocess.run(["docker", "network", "inspect", "bridge"], capture_output=True).returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CgroupReader:
    """CPU time and working set of one container's cgroup (v1 or v2), read from this host."""

    def __init__(self, pid: int):
        self.cpu_file: Path | None = None
        self.memory_dir: Path | None = None
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            names, path = controllers.split(","), path.lstrip("/")
            if controllers == "":  # v2: one tree, on its own or beside v1 (hybrid)
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    if (root / path / "cpu.stat").is_file() and (root / path / "memory.current").is_file():
                        self.cpu_file, self.memory_dir = root / path / "cpu.stat", root / path
                        break
            elif "cpuacct" in names:
                for mount in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"):
                    if (Path("/sys/fs/cgroup") / mount / path / "cpuacct.usage").is_file():
                        self.cpu_file = Path("/sys/fs/cgroup") / mount / path / "cpuacct.usage"
            elif "memory" in names and (Path("/sys/fs/cgroup/memory") / path / "memory.usage_in_bytes").is_file():
                self.memory_dir = Path("/sys/fs/cgroup/memory") / path
        if self.cpu_file is None or self.memory_dir is None:
            raise OSError(f"no cgroup files found for PID {pid}")

    def cpu_seconds(self) -> float:
        text = self.cpu_file.read_text()
        if self.cpu_file.name == "cpu.stat":
            return int(text.split("usage_usec", 1)[1].split()[0]) / 1e6
        return int(text) / 1e9

    def working_set(self) -> int:
        """Memory in use less the file cache the kernel may drop: what `docker stats` and kubelet report."""
        v1 = (self.memory_dir / "memory.usage_in_bytes").is_file()
        usage = int((self.memory_dir / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
        stat = dict(line.split() for line in (self.memory_dir / "memory.stat").read_text().splitlines())
        inactive = int(stat.get("total_inactive_file" if v1 else "inactive_file", 0))
        return max(0, usage - inactive)


class Sampler:
    """Reads the container's CPU time and working set every SAMPLE_EVERY seconds while a step runs."""

    def __init__(self, reader: CgroupReader | None):
        self.reader, self.samples, self.peak = reader, [], None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Sampler":
        if self.reader:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                memory = self.reader.working_set()
                self.samples.append((time.monotonic(), self.reader.cpu_seconds()))
                self.peak = memory if self.peak is None else max(self.peak, memory)
            if self._stop.wait(SAMPLE_EVERY):
                return

    def cpu_used(self, since: float) -> float | None:
        """CPUs used on average from `since` to the last reading."""
        window = [s for s in self.samples if s[0] >= since]
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return None
        return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


# ---------------------------------------------------------------------------------------------------------------
# Load


def load_step(port: int, bodies: list[bytes], clients: int, plan: Plan, cpus: list[int]) -> dict[str, Any]:
    """One closed-loop load from bench/loadgen.py, in a child process pinned to `cpus`."""
    job = {"port": port, "requests": [b.decode("latin-1") for b in bodies], "clients": clients,
           "seconds": plan.step_seconds, "warmup": plan.warmup_seconds, "cpus": cpus}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench.loadgen"], input=json.dumps(job), capture_output=True,
                          text=True, cwd=ROOT, timeout=plan.step_seconds + plan.warmup_seconds + 120)  # fmt: skip
    if done.returncode != 0:
        raise TuneError(f"the load generator failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout)


def url_step(url: str, bodies: list[dict], clients: int, plan: Plan) -> dict[str, Any]:
    """A closed loop of `clients` HTTPS connections to a deployed service (httpx), the same figures as load_step."""
    return asyncio.run(_url_load(url, bodies, clients, plan))


async def _url_load(url: str, bodies: list[dict], clients: int, plan: Plan) -> dict[str, Any]:
    import httpx

    from bench.loadgen import percentile

    encoded = [json.dumps(b).encode() for b in bodies]
    headers = {"content-type": "application/json", **plan.headers}
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    count_from, stop_at = started + plan.warmup_seconds, started + plan.warmup_seconds + plan.step_seconds
    cpu = time.process_time()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:

        async def loop(number: int) -> None:
            nonlocal errors
            turn = number
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    response = await client.post(f"{url}/predict", content=encoded[turn % len(encoded)])
                    ok = 200 <= response.status_code < 300
                except httpx.HTTPError:
                    ok = False
                turn += 1
                if sent >= count_from:
                    if ok:
                        latencies.append(time.perf_counter() - sent)
                    else:
                        errors += 1

        await asyncio.gather(*(loop(n) for n in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / plan.step_seconds,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "errors": errors, "cpu_share": (time.process_time() - cpu) / wall}  # fmt: skip


def sweep(plan: Plan, measure: Callable[[int], Step], show: Callable[[Step], None]) -> list[Step]:
    """Concurrency 1, 2, 4, ... (or plan.levels) until p99 passes the objective, an error comes back or throughput
    grows less than GROWTH over the best step so far PATIENCE steps in a row."""
    steps: list[Step] = []
    best, flat = 0.0, 0
    for level in concurrencies(plan):
        step = measure(level)
        steps.append(step)
        show(step)
        if plan.levels:
            continue
        if not sizing.meets(step, plan.p99_ms):
            break
        flat = flat + 1 if step.rps < best * (1 + GROWTH) else 0
        if flat >= PATIENCE:
            break
        best = max(best, step.rps)
    return steps


def step_from(figures: dict[str, Any], cpu_util: float | None, peak: int | None, lower_bound: bool) -> Step:
    return Step(figures["clients"], figures["rps"], figures["p50_ms"], figures["p99_ms"], figures["errors"], cpu_util,
                peak, lower_bound or figures["cpu_share"] >= SATURATED)


def describe_step(label: str, step: Step, suffix: str = "") -> str:
    cpu = "-" if step.cpu_util is None else f"{step.cpu_util * 100:.0f}%"
    memory = "-" if step.peak_rss_bytes is None else f"{step.peak_rss_bytes / sizing.MIB:.0f} MiB"
    line = (f"  {label:<22} c={step.concurrency:<4} rps {step.rps:>9.1f}  p50 {step.p50_ms:>8.2f} ms  "
            f"p99 {step.p99_ms:>8.2f} ms  errors {step.errors:<3} cpu {cpu:>4}  mem {memory}")  # fmt: skip
    if step.lower_bound:
        line += "  [lower bound: the load generator saturated or shared the CPUs]"
    return line + suffix


# ---------------------------------------------------------------------------------------------------------------
# One shape in Docker


def wait_ready(containers: Containers, name: str, port: int, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = containers.state(name)
        if state and state.get("Status") != "running":
            oom = " (killed for memory: give the shape more)" if state.get("OOMKilled") else ""
            raise TuneError(f"the service stopped before it was ready{oom}; its log ends:\n{containers.logs(name)}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            if body.get("model_loaded"):
                return
            if body.get("status") == "failed":
                raise TuneError(f"the model failed to load in the image: {body.get('error')}; check the image "
                                "(--image) runs this model (`invoke model.compare`)")
        time.sleep(0.3)
    raise TuneError(f"the service did not load the model within {timeout:.0f}s; its log ends:\n{containers.logs(name)}")


def check_bodies(url: str, bodies: list[dict], headers: dict[str, str]) -> None:
    """Every body once, before the sweep: a refused one fails now, with the service's reason."""
    import httpx

    with httpx.Client(timeout=60, headers=headers) as client:
        for number, body in enumerate(bodies[:64], 1):
            try:
                response = client.post(f"{url}/predict", json=body)
            except httpx.HTTPError as exc:
                raise TuneError(f"{url}/predict did not answer ({type(exc).__name__}: {exc}); check the URL and "
                                "that the service is up") from None
            if response.status_code == 401:
                raise TuneError(f"{url}/predict answered 401: {smoke.NEEDS_KEY}, or --identity-token for a private "
                                "Cloud Run service")
            if response.status_code != 200:
                raise TuneError(f"the service refused request {number} ({response.status_code}: "
                                f"{response.text[:300]}); give --samples with /predict bodies the model takes")


def measure_shape(plan: Plan, model: Model, shape: Shape, containers: Containers, cpus: list[int], network: str,
                  progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    from bench.loadgen import request_bytes

    placement = place(shape, cpus)
    port = free_port()
    started = time.monotonic()
    name = containers.start(plan, model, shape, placement, port, network)
    try:
        wait_ready(containers, name, port, 300)
        check_bodies(f"http://127.0.0.1:{port}", model.bodies, {})
        containers.limit(name, shape, placement)
        try:
            reader = CgroupReader(containers.pid(name)) if getattr(containers, "confined", True) else None
        except OSError:
            reader = None
        bodies = [request_bytes("POST", "/predict", json.dumps(b).encode()) for b in model.bodies]
        notes = placement.notes(shape)
        if not getattr(containers, "confined", True):
            notes.append("no cgroup holds the service: no CPU or memory figures")
        elif reader is None:
            notes.append("the container's cgroup could not be read from here: no CPU or memory figures")
        for note in notes:
            progress(f"  {shape.name}: {note}")

        def measure(level: int) -> Step:
            with Sampler(reader) as sampler:
                begun = time.monotonic()
                figures = load_step(port, bodies, level, plan, placement.loadgen_cpus)
            used = sampler.cpu_used(begun + plan.warmup_seconds)
            step = step_from(figures, None if used is None else used / placement.quota_cpus, sampler.peak,
                             placement.shared)
            state = containers.state(name)
            if state.get("Status") != "running":
                step.errors += 1
                step.notes.append("the container stopped" + (" (out of memory)" if state.get("OOMKilled") else ""))
            return step

        suffix = f"  [{UNCONFINED}]" if plan.unconfined else ""
        steps = sweep(plan, measure, lambda s: progress(describe_step(shape.name, s, suffix)))
    finally:
        containers.remove(name)
    return {"shape": shape, "steps": steps, "notes": notes, "placement": placement,
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The report


def fly_region(c: Context) -> str:
    try:
        return tomllib.loads(Path(c.fly.config).read_text()).get("primary_region") or "iad"
    except (OSError, tomllib.TOMLDecodeError):
        return "iad"


def price_shape(c: Context, table: dict, shape: Shape, result: dict[str, Any]) -> dict[str, Any]:
    rec = result["recommendation"]
    if rec is None:
        return {}
    rps = rec["point"]["sustained_rps"]
    if rps <= 0:
        return {}
    if shape.target == "cloudrun":
        memory = sizing.parse_memory(rec["settings"]["memory"], "memory") / sizing.GIB
        rates = {"request": rec["point"]["billed_rps"], "instance": rps}  # instance-based bills idle time too
        figures = {f"{billing}_{tier}": round(prices.cloudrun_per_million(table, tier, billing, shape.vcpus, memory,
                                                                          rates[billing]), 4)
                   for tier in ("tier1", "tier2") for billing in ("request", "instance")}  # fmt: skip
        tier = prices.cloudrun_tier(table, str(c.gcp.region))
        request, instance = figures[f"request_{tier}"], figures[f"instance_{tier}"]
        return {"usd_per_million": request, "tier": tier, "region": str(c.gcp.region), "by_billing": figures,
                "cheaper_billing": "instance" if instance < request else "request",
                # instance-based billing bills idle time too: it is cheaper while instances are busy more than this
                "instance_cheaper_when_busy_over": round(instance / request, 3)}  # fmt: skip
    memory = sizing.parse_memory(rec["settings"]["memory"], "memory") / sizing.GIB
    region = fly_region(c)
    return {"usd_per_million": round(prices.fly_per_million(table, shape.cpu_kind, shape.vcpus, memory, region, rps), 4),
            "region": region,
            "usd_per_second": prices.fly_per_second(table, shape.cpu_kind, shape.vcpus, memory, region)}  # fmt: skip


def build_document(c: Context, plan: Plan, model: Model | None, results: list[dict], table: dict, run: dict) -> dict:
    shapes = []
    for result in results:
        shape: Shape = result["shape"]
        rec = result["recommendation"]
        entry = {**shape.as_json(), "steps": [s.as_json() for s in result["steps"]], "notes": result["notes"],
                 "seconds": result.get("seconds"), "recommended": rec["point"] if rec else None,
                 "settings": rec["settings"] if rec else None, "service": rec["service"] if rec else None}  # fmt: skip
        if rec and rec["memory_note"]:
            entry["notes"].append(rec["memory_note"])
        entry.update(price_shape(c, table, shape, result))
        entry.setdefault("usd_per_million", None)
        shapes.append(entry)
    priced = [s for s in shapes if s["usd_per_million"] is not None]
    choice = min(priced, key=lambda s: s["usd_per_million"]) if priced else None
    return {
        "target": plan.target, "run": run, "slo": {"p99_ms": plan.p99_ms},
        "prices": {**prices.sources(table), "table": table}, "shapes": shapes,
        "choice": {"shape": choice["name"], "usd_per_million": choice["usd_per_million"],
                   "settings": choice["settings"], "service": choice["service"]} if choice else None,
    }  # fmt: skip


def render_text(document: dict) -> str:
    lines = [f"\ninvoke tune --target {document['target']}: p99 objective {document['slo']['p99_ms']:g} ms, "
             f"model sha256 {document['run'].get('model_sha256', '-')[:12]}, {document['run']['where']}"]  # fmt: skip
    for shape in document["shapes"]:
        lines.append(f"\n{shape['name']}  ({shape['quota_cpus']:g} CPU of quota, {shape['memory']})")
        lines.append("  concurrency       rps    p50 ms    p99 ms  errors  cpu   peak MiB")
        for step in shape["steps"]:
            cpu = "-" if step["cpu_util"] is None else f"{step['cpu_util'] * 100:.0f}%"
            memory = "-" if step["peak_rss_bytes"] is None else f"{step['peak_rss_bytes'] / sizing.MIB:.0f}"
            mark = " *" if shape["recommended"] and step["concurrency"] == shape["recommended"]["concurrency"] else ""
            lower = "  (lower bound)" if step["lower_bound"] else ""
            unconfined = f"  [{UNCONFINED}]" if document["run"].get("unconfined") else ""
            lines.append(f"  {step['concurrency']:>11} {step['rps']:>9.1f} {step['p50_ms']:>9.2f} {step['p99_ms']:>9.2f} "
                         f"{step['errors']:>7} {cpu:>4} {memory:>9}{mark}{lower}{unconfined}")  # fmt: skip
        for note in shape["notes"]:
            lines.append(f"  note: {note}")
        if shape.get("burst"):
            lines.append(f"  note: {shape['burst']}")
        rec = shape["recommended"]
        if not rec:
            lines.append(f"  no concurrency met p99 <= {document['slo']['p99_ms']:g} ms without errors on this shape")
            continue
        lines.append(f"  recommended: concurrency {rec['concurrency']} ({rec['rps']:.1f} rps, p99 {rec['p99_ms']:.1f} ms); "
                     f"sustained under the platform's scaling: {rec['sustained_rps']:.1f} rps per instance")  # fmt: skip
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in shape["settings"].items())
                     + "; service: " + ", ".join(f"{k}={v}" for k, v in shape["service"].items()))  # fmt: skip
        if document["target"] == "cloudrun":
            by = shape["by_billing"]
            lines.append(f"  USD per million predictions ({shape['region']}, {shape['tier']}): request-based "
                         f"{by['request_' + shape['tier']]:.4f}, instance-based {by['instance_' + shape['tier']]:.4f} "
                         f"(Tier 1 {by['request_tier1']:.4f} / {by['instance_tier1']:.4f}, Tier 2 "
                         f"{by['request_tier2']:.4f} / {by['instance_tier2']:.4f})")  # fmt: skip
            lines.append(f"  cheaper at this load: {shape['cheaper_billing']}-based billing (instance-based stays "
                         f"cheaper while instances are busy over {shape['instance_cheaper_when_busy_over'] * 100:.0f}% "
                         "of their life)")  # fmt: skip
        else:
            lines.append(f"  USD per million predictions ({shape['region']}): {shape['usd_per_million']:.4f}")
    sources = document["prices"]
    lines.append(f"\nprices: Cloud Run {sources['cloudrun']['source']} (as of {sources['cloudrun']['as_of']}); Fly "
                 f"{sources['fly']['source']} (as of {sources['fly']['as_of']}); override with tune.prices")  # fmt: skip
    choice = document["choice"]
    if choice:
        lines.append(f"choice: {choice['shape']} at {choice['usd_per_million']:.4f} USD per million predictions: "
                     + ", ".join(f"{k}={v}" for k, v in choice["settings"].items()))  # fmt: skip
    else:
        lines.append("choice: none; no shape met the objective: try a larger shape, or a looser --p99-ms")
    return "\n".join(lines)


def machine_figures() -> dict[str, Any]:
    cpu_model, flags = "", []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu_model:
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu_model, "cpu_flags": wanted,
            "python": platform.python_version()}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The task


@task(
    help={
        "target": "cloudrun or fly: which platform's shapes, scaling rules and prices",
        "model": "the model: gs://BUCKET/PATH.onnx or a local file (default: model.uri)",
        "image": "the image to run (default: the one `invoke image.build` makes for this commit)",
        "samples": "JSONL file of /predict bodies to send (default: tune.samples, else the seeded requests "
                   "`invoke model.compare` makes from the model's metadata)",
        "p99_ms": "the objective: p99 latency in ms that a recommended point must meet (default: tune.p99_ms)",
        "shapes": "shapes to measure: Cloud Run CPU:MEMORY list (1:2Gi,2:4Gi), Fly SIZE:MEMORY list "
                  "(shared-cpu-2x:2gb) (default: tune.cloudrun_shapes / tune.fly_shapes)",
        "levels": "measure these concurrencies only (e.g. 8), instead of sweeping 1, 2, 4, ...",
        "step_seconds": "seconds each step is measured, after its warm-up (default: tune.step_seconds)",
        "warmup_seconds": "seconds of load before each step's figures count (default: tune.warmup_seconds)",
        "json": "print one JSON document instead of the report",
        "write": "put the chosen settings into invoke.yaml (cloudrun.*) or fly.toml, with a comment naming the run",
        "plot": "write rps and p99 against concurrency as PNG or SVG (a path; without one, beside the JSON)",
        "out": "where to write the JSON document (default: tune.out, else build/tune/tune-TARGET.json)",
        "url": "measure this deployed service instead of containers here (pin it to one instance first)",
        "token": "bearer token for --url (private services)",
        "identity_token": "send `gcloud auth print-identity-token` with --url (private Cloud Run services)",
        "api_key": "the service's API key for --url (default: smoke.api_key, else $ONNX_SERVE_API_KEY)",
        "reprice": "recommend and price a saved run again (its JSON) without measuring: after a change of "
                   "tune.prices, --p99-ms or the rules",
        "unconfined": "without Docker and root: run the service on this machine as it is (no CPU quota or memory "
                      "limit; every figure says so)",
    },
    optional=["plot"],
)
def tune(
    c, target="", model="", image="", samples="", p99_ms=None, shapes="", levels="", step_seconds=None,
    warmup_seconds=None, json=False, write=False, plot=None, out="", url="", token="", identity_token=False, api_key="",
    unconfined=False, reprice="",
):  # fmt: skip
    """Measure each instance shape under load, recommend its settings and print the price of a million predictions."""
    t = c.tune
    target = target or t.target
    if target not in ("cloudrun", "fly"):
        raise Exit(f"--target {target!r}: tune sizes for cloudrun or fly")
    progress = (lambda line: print(line, file=sys.stderr, flush=True)) if json else (lambda line: print(line, flush=True))
    run_id = uuid.uuid4().hex[:8]
    runners: list[Any] = []  # what started services: Containers or tune_process.Processes
    started = time.monotonic()
    try:
        table = prices.price_table(t.prices)
        plan = Plan(
            target=target,
            shapes=sizing.parse_shapes(target, shapes or t[f"{target}_shapes"]) if not (url or reprice) else [],
            p99_ms=positive("--p99-ms", p99_ms if p99_ms is not None else t.p99_ms),
            step_seconds=positive("--step-seconds", step_seconds if step_seconds is not None else t.step_seconds),
            warmup_seconds=float(warmup_seconds if warmup_seconds is not None else t.warmup_seconds),
            max_concurrency=int(t.max_concurrency),
            levels=parse_levels(levels or t.levels),
            unconfined=unconfined,
        )
        if reprice:
            document = _reprice(c, plan, reprice, table)
        elif url:
            document = _tune_url(c, plan, url.rstrip("/"), samples or t.samples, shapes, token, identity_token,
                                 api_key, table, progress)  # fmt: skip
        else:
            document = _tune_local(c, plan, model or str(c.model.uri), image, samples or t.samples, table, runners,
                                   progress, run_id)  # fmt: skip
    except TuneError as exc:
        raise Exit(f"tune: {exc}", code=2) from None
    except KeyboardInterrupt:
        for runner in runners:
            runner.remove_all()
        raise Exit("tune: interrupted; every container (or service) it started is removed", code=130) from None
    finally:
        for runner in runners:
            runner.remove_all()
    document["run"]["repriced_seconds" if reprice else "seconds"] = round(time.monotonic() - started, 1)
    out_path = Path(out or t.out or ROOT / "build" / "tune" / f"tune-{target}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json_lib.dumps(document, indent=2) + "\n")
    if plot is not None:
        from toolkit import tune_plot

        plot_path = Path(plot) if isinstance(plot, str) and plot else out_path.with_suffix(".png")
        tune_plot.plot(document, plot_path)
        document["run"]["plot"] = str(plot_path)
    if write:
        from toolkit import tune_write

        document["run"]["written"] = tune_write.write(c, document)
    if json:
        print(json_lib.dumps(document, indent=2))
    else:
        print(render_text(document))
        print(f"\nJSON: {out_path}" + (f"; plot: {document['run']['plot']}" if plot is not None else ""))
        for line in document["run"].get("written", []):
            print(f"wrote {line}")
    if document["choice"] is None:
        raise Exit(code=1)


def _runner(c: Context, plan: Plan, image: str, run_id: str, work: Path) -> tuple[Any, str]:
    """Docker when an engine answers (tune.runtime auto or docker), else the service under gunicorn in a cgroup per
    shape (root), else, with --unconfined, on this machine as it is; and how the run says where it measured."""
    from toolkit import tune_process

    runtime = str(c.tune.runtime)
    if runtime not in ("auto", "docker", "process"):
        raise TuneError(f"tune.runtime is {runtime!r}: use auto, docker or process")
    if runtime != "process" and docker_image.engine_answers(c):
        containers = Containers(run_id)
        plan.image = image or c.tune.image or docker_image.image_ref(c, "local", docker_image.default_tag(c))
        if containers.docker("image", "inspect", plan.image, check=False).returncode != 0:
            raise TuneError(f"no image {plan.image} in the Docker engine: build it with `invoke image.build`, or pass "
                            "--image")
        return containers, "Docker on this machine: each shape's CPU quota on this machine's CPU, not a platform host"
    if runtime == "docker":
        raise TuneError("no Docker engine answers: start Docker (or point DOCKER_HOST at one), or measure a deployed "
                        "service with --url")
    fix = ("start Docker (or point DOCKER_HOST at one), run as root so that cgroups can limit the service, measure a "
           "deployed service with --url, or pass --unconfined to measure this machine as it is")
    if plan.unconfined:
        return tune_process.Processes(run_id, ROOT, work, confined=False), UNCONFINED
    if os.geteuid() != 0:
        raise TuneError(f"no Docker engine answers and this user is not root, so nothing can hold the service to a "
                        f"shape: {fix}")
    try:
        tune_process.Cgroup(f"onnx-serve-tune-{run_id}-probe").remove()
    except tune_process.CgroupUnavailable as exc:
        raise TuneError(f"no Docker engine answers and {exc}: {fix}") from None
    return (tune_process.Processes(run_id, ROOT, work, confined=True),
            "gunicorn from this checkout in a cgroup per shape (no Docker): the shape's CPU quota on this machine's CPU")


def _tune_local(c: Context, plan: Plan, uri: str, image: str, samples: str, table: dict, runners: list[Any],
                progress: Callable[[str], None], run_id: str) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="onnx-serve-tune-") as cache:
        runner, where = _runner(c, plan, image, run_id, Path(cache))
        runners.append(runner)
        try:
            progress(f"loading {uri} and checking the request bodies ...")
            model = prepare_model(uri, str(c.model.sha256 or "") if uri == str(c.model.uri) else "", samples,
                                  Path(cache))  # fmt: skip
            network = "bridge" if isinstance(runner, Containers) and bridge_network() else "host"
            cpus = sorted(os.sched_getaffinity(0))
            progress(f"model sha256 {model.sha256[:12]}, {len(model.bodies)} request bodies; {where}; "
                     f"{len(plan.shapes)} shape(s), p99 objective {plan.p99_ms:g} ms")  # fmt: skip
            results = []
            for shape in plan.shapes:
                progress(f"{shape.name}: starting the service ...")
                result = measure_shape(plan, model, shape, runner, cpus, network, progress)
                result["recommendation"] = sizing.recommend(shape, result["steps"], plan.p99_ms)
                results.append(result)
        finally:
            runner.remove_all()  # before the folder the model is mounted from goes
    run = {"id": run_id, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "model": model.uri, "model_sha256": model.sha256, "image": plan.image or None,
           "samples": samples or "seeded", "step_seconds": plan.step_seconds, "warmup_seconds": plan.warmup_seconds,
           "machine": machine_figures(), "where": where, "unconfined": plan.unconfined,
           "loadgen": "bench/loadgen.py (asyncio raw-socket HTTP/1.1 keep-alive, closed loop), pinned"}  # fmt: skip
    return build_document(c, plan, model, results, table, run)


def _tune_url(c: Context, plan: Plan, url: str, samples: str, shapes: str, token: str, identity_token: bool,
              api_key: str, table: dict, progress: Callable[[str], None]) -> dict:  # fmt: skip
    import httpx
    import numpy as np

    if identity_token:
        token = smoke.gcloud_identity_token(c)
    plan.headers = smoke.Access(token, api_key or smoke.configured_api_key(c)).headers
    shape_text = shapes or (f"{c.cloudrun.cpu}:{c.cloudrun.memory}" if plan.target == "cloudrun" else _fly_shape(c))
    plan.shapes = sizing.parse_shapes(plan.target, shape_text)
    if len(plan.shapes) != 1:
        raise TuneError("--url measures the one shape the service runs: give one --shapes entry (what it is deployed as)")
    shape = plan.shapes[0]
    with httpx.Client(timeout=10, headers=plan.headers) as client:
        try:
            health = smoke.wait_until_loaded(client, url, time.monotonic() + URL_WAIT, progress)
            metadata = smoke.get_json(client, f"{url}/metadata")
        except smoke.SmokeFailure as exc:
            raise TuneError(f"{url} is not serving: {exc}; check the URL, and deploy first") from None
    if samples:
        try:
            bodies = compare.read_samples(samples)
        except compare.CompareError as exc:
            raise TuneError(str(exc)) from None
    else:
        rng = np.random.default_rng(compare.SEED)
        bodies = [smoke.sample_request(metadata, 1, rng) for _ in range(compare.SEEDED_REQUESTS)]
    check_bodies(url, bodies, plan.headers)
    progress(f"{url}: sha256 {str((health.get('model') or {}).get('sha256'))[:12]}; sweeping {shape.name} "
             "(pin the service to one instance while it runs)")  # fmt: skip
    started = time.monotonic()
    steps = sweep(plan, lambda level: step_from(url_step(url, bodies, level, plan), None, None, False),
                  lambda s: progress(describe_step(shape.name, s)))  # fmt: skip
    result = {"shape": shape, "steps": steps, "seconds": round(time.monotonic() - started, 1),
              "notes": ["measured on the deployed service over the network: latency includes the round trip; keep "
                        "it on one instance (Cloud Run --max-instances=1, Fly one Machine) while it runs"],
              "recommendation": sizing.recommend(shape, steps, plan.p99_ms)}  # fmt: skip
    run = {"id": "url", "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "url": url,
           "model_sha256": str((health.get("model") or {}).get("sha256") or ""), "machine": machine_figures(),
           "step_seconds": plan.step_seconds, "warmup_seconds": plan.warmup_seconds,
           "where": f"the deployed service at {url}", "loadgen": "httpx AsyncClient, closed loop"}  # fmt: skip
    return build_document(c, plan, None, [result], table, run)


def _reprice(c: Context, plan: Plan, path: str, table: dict) -> dict:
    """The steps of a saved run, recommended and priced again under today's rules, prices and objective."""
    try:
        saved = json_lib.loads(Path(path).read_text())
        plan.target = saved["target"]
        results = []
        for entry in saved["shapes"]:
            shape = sizing.parse_shapes(plan.target, entry["name"])[0]
            steps = [Step(s["concurrency"], s["rps"], s["p50_ms"], s["p99_ms"], s["errors"], s["cpu_util"],
                          s["peak_rss_bytes"], s["lower_bound"], s.get("notes", [])) for s in entry["steps"]]  # fmt: skip
            notes = [n for n in entry.get("notes", []) if "peak plus headroom" not in n]
            results.append({"shape": shape, "steps": steps, "notes": notes, "seconds": entry.get("seconds"),
                            "recommendation": sizing.recommend(shape, steps, plan.p99_ms)})  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TuneError(f"--reprice {path}: not a saved tune run ({type(exc).__name__}: {exc}); give the JSON a run "
                        "wrote (--out)") from None
    plan.unconfined = bool(saved["run"].get("unconfined"))
    return build_document(c, plan, None, results, table, {**saved["run"], "repriced_from": path})


def _fly_shape(c: Context) -> str:
    try:
        vm = (tomllib.loads(Path(c.fly.config).read_text()).get("vm") or [{}])[0]
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TuneError(f"cannot read {c.fly.config} ({exc}): give --shapes SIZE:MEMORY") from None
    return f"{vm.get('size', 'shared-cpu-1x')}:{vm.get('memory', '256mb')}"
