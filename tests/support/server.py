"""The service as users run it: a real gunicorn master with Uvicorn workers, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from tests.support.models import ROOT
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.waiting import wait_for

GUNICORN = [str(Path(sys.executable).with_name("gunicorn")), "-c", "service/gunicorn.conf.py", "service.app:app"]


@dataclass
class Service:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> tuple[int, dict] | None:
        try:
            response = httpx.get(self.url + "/health", timeout=2)
        except httpx.TransportError:
            return None
        return response.status_code, response.json()

    def wait_answering(self, timeout: float = 30) -> tuple[int, dict]:
        return wait_for(lambda: self._alive() and self.health(), timeout, what="/health to answer")

    def wait_state(self, state: str, timeout: float = 60) -> dict:
        return self.wait_health(lambda body: body["status"] == state, timeout, what=f"/health status {state!r}")

    def wait_health(self, reached, timeout: float = 60, what: str = "/health to show a state") -> dict:
        """The /health body once `reached(body)` is true of it (whatever its status code)."""

        def answer():
            self._alive()
            answered = self.health()
            return answered and reached(answered[1]) and answered[1]

        return wait_for(answer, timeout, what=what)

    def wait_log(self, reached, timeout: float = 30, what: str = "a log line") -> list[dict]:
        """The JSON log lines once `reached(lines)` is true of them: what a worker logs reaches the file a little
        after the event, and the other workers' lines later still."""
        return wait_for(lambda: (lines := self.log_lines()) and reached(lines) and lines, timeout, what=what)

    def predict(self, body, **kwargs) -> httpx.Response:
        kwargs.setdefault("timeout", 30)
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + "/predict", content=body, **kwargs)
        return httpx.post(self.url + "/predict", json=body, **kwargs)

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
        return lines

    def raw_log(self) -> str:
        return self.log_path.read_text()

    def connections(self) -> int:
        """Established TCP connections to the service's port (server side), from /proc/net/tcp: how a test knows
        that its clients' requests have reached the service."""
        established = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            established += state == "01" and int(local.rsplit(":", 1)[1], 16) == self.port
        return established

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.raw_log()[-4000:]}")
        return True


def service_env(model_uri: str, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MODEL_SHA256", "WEB_CONCURRENCY", "PORT"}}
    env.update(MODEL_URI=model_uri, PORT=str(port), HOST="127.0.0.1", EXIT_ON_LOAD_FAILURE_AFTER="-1")
    # Metrics on, as deployed, but not on the default 9091: services of parallel runs share this loopback.
    env["METRICS_PORT"] = str(next(p for p in iter(free_port, None) if p != port))
    env.update(extra)
    return env


@contextlib.contextmanager
def run_service(model_uri: str, log_dir: Path, **env: str) -> Iterator[Service]:
    """Start gunicorn with the service's own config; env values override the defaults of `service_env`."""
    port = int(env.pop("PORT", 0)) or free_port()
    log_path = log_dir / f"service-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            GUNICORN, cwd=ROOT, env=service_env(model_uri, port, **env),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    service = Service(process, port, log_path)
    try:
        yield service
    finally:
        stop(service.process)


def read_answer(conn: socket.socket) -> tuple[int, bytes, bytes]:
    """One HTTP answer read from a raw socket by its Content-Length: (status, head in lower case, body). A reset
    raises ConnectionResetError; a close before the answer's end, ConnectionError."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of the answer")
        rest += chunk
    return int(head.split(b" ", 2)[1]), head.lower(), rest[:length]
