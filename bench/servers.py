"""Start what the benchmarks measure, as real processes on 127.0.0.1, and look at them from outside.

Reuses the test helpers: the service's environment (`service_env`), free ports and stopping by process group.
Every gunicorn here runs the service's own config and its Uvicorn worker class, subclassed only to log which
event loop and HTTP parser it runs (bench/runtime_probe.py); LitServe logs the same line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bench import runtime_probe
from tests.support.models import ROOT
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.server import GUNICORN, service_env

SERVICE_APP = "service.app:app"
FLOOR_APP = "bench.floor_app:app"
SEED_FASTAPI_APP = "bench.peers.seed_fastapi:app"
PROBED_WORKER = "bench.runtime_probe.UvicornWorker"


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    started_at: float  # perf_counter() just before the process was started
    log_path: Path

    def health(self, timeout: float = 2.0) -> tuple[int, dict] | None:
        """(status, body) of GET /health, or None while nothing answers; a body that is not JSON reads as {}."""
        try:
            status, body = request(self.port, "GET", "/health", timeout=timeout)
        except OSError:
            return None
        try:
            return status, json.loads(body)
        except ValueError:  # LitServe answers "ok"
            return status, {}

    def alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.process.args} exited with {self.process.returncode}:\n{tail}")

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ((answer := self.health()) and answer[0] == 200):
            self.alive()
            if answer and answer[1].get("status") == "failed":
                raise RuntimeError(f"the model failed to load: {answer[1].get('error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.process.args} not ready after {timeout}s; log: {self.log_path}")
            time.sleep(0.05)

    def runtime(self) -> str:
        """The event loop and HTTP parser the server logged that it runs: 'uvloop + httptools'."""
        return runtime_probe.read(self.log_path.read_text(errors="replace"))

    def worker_pid(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        if len(children) != 1:
            raise RuntimeError(f"expected one gunicorn worker, found {children}")
        return int(children[0])


@contextlib.contextmanager
def gunicorn(app: str, model_uri: str, log_dir: Path, **env: str) -> Iterator[Server]:
    """gunicorn with the service's own config file serving `app` (the service, the floor or the seed FastAPI app)."""
    port = free_port()
    with _started([*GUNICORN[:-1], "-k", PROBED_WORKER, app], port, log_dir / f"{app.split(':')[0]}-{port}.log",
                  service_env(model_uri, port, **env)) as server:  # fmt: skip
        yield server


@contextlib.contextmanager
def litserve(python: Path, model_path: Path, log_dir: Path, max_batch_size: int, batch_timeout: float) -> Iterator[Server]:
    """LitServe (bench/peers/litserve_app.py) from its own environment's `python`: one HTTP server, one worker."""
    port = free_port()
    command = [str(python), "-m", "bench.peers.litserve_app", str(model_path), str(port), str(max_batch_size),
               str(batch_timeout)]  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PYTHONPATH": str(ROOT)}
    with _started(command, port, log_dir / f"litserve-{port}.log", env) as server:
        yield server


@contextlib.contextmanager
def _started(command: list[str], port: int, log_path: Path, env: dict[str, str]) -> Iterator[Server]:
    with open(log_path, "wb") as log:
        started_at = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield Server(process, port, started_at, log_path)
    finally:
        stop(process)


def floor_start_seconds(model_uri: str, directory: Path, env: dict[str, str], readers: int = 1) -> float:
    """Seconds from starting bench/floor_start.py to its "ready": fetch the model (one stream, or every file of
    its folder with `readers` concurrent ranged reads) and open a session, bare."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "floor_start.py"), model_uri, str(directory), str(readers)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        seconds = time.perf_counter() - started
        if line.strip() != b"ready":
            process.wait(10)
            raise RuntimeError(f"bench/floor_start.py failed: {process.stderr.read().decode(errors='replace')[-3000:]}")
        return seconds
    finally:
        stop(process)
        process.stdout.close()
        process.stderr.close()


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
