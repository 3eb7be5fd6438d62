"""Cold start and memory: time from process start to the first /health answer and to "model loaded", and the
worker's peak RSS while loading and then serving; the floor is a bare process that fetches and opens the model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import servers

POLL_SECONDS = 0.01


@dataclass(frozen=True)
class ServiceStart:
    first_answer: float  # seconds from process start to the first /health answered, in any state
    ready: float  # seconds from process start to /health = 200 with model_loaded true
    peak_rss: int  # the worker's VmHWM after loading and answering `requests` predictions
    steps: dict[str, float] = field(default_factory=dict)  # /health's load_steps: download, verify, session, ...


def service_start(model_uri: str, env: dict[str, str], log_dir: Path, body: bytes, requests: int) -> ServiceStart:
    """Start the service with an empty model cache, time it to ready, then serve `requests` predictions."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=log_dir))
    try:
        with servers.gunicorn(servers.SERVICE_APP, model_uri, log_dir, MODEL_CACHE_DIR=str(cache), **env) as server:
            first_answer = ready = None
            deadline = time.monotonic() + 300
            while ready is None:
                answer = server.health(timeout=1)
                now = time.perf_counter() - server.started_at
                if answer:
                    first_answer = first_answer or now
                    status, health = answer
                    if status == 200 and health["model_loaded"]:
                        ready, steps = now, health.get("load_steps", {})
                    elif health["status"] == "failed":
                        raise RuntimeError(f"the model failed to load: {health['error']}")
                server.alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service was not ready after 300 s; log: {server.log_path}")
                time.sleep(POLL_SECONDS)
            for _ in range(requests):
                status, answer = servers.request(server.port, "POST", "/predict", body)
                if status != 200:
                    raise RuntimeError(f"/predict answered {status}: {answer[:300]!r}")
            return ServiceStart(first_answer, ready, servers.peak_rss_bytes(server.worker_pid()), steps)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def floor_start(model_uri: str, env: dict[str, str], log_dir: Path) -> float:
    directory = Path(tempfile.mkdtemp(prefix="floor-", dir=log_dir))
    try:
        return servers.floor_start_seconds(model_uri, directory, env)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
