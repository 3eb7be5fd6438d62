"""Run the project image as a platform would, reached only through the container's own network namespace.

The container gets `--network none`: its own loopback and nothing else. The tests enter that namespace
(setns on dedicated threads) to start a gcp-storage-emulator next to the service and to send it HTTP
requests, so no traffic leaves 127.0.0.1 of a namespace the test created. Root is needed for setns.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from tests.support.docker_engine import DockerEngine
from tests.support.external import missing_tool
from tests.support.processes import stop
from tests.support.waiting import wait_for
from tests.support.storage_emulator import EMULATOR, StorageEmulator

EMULATOR_PORT = 9023  # inside the container's namespace, so any port is free


class NetworkNamespace:
    """Calls that run on threads inside the network namespace of process `pid`."""

    def __init__(self, pid: int, threads: int = 4):
        self._fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        self._pool = ThreadPoolExecutor(threads, "netns", initializer=os.setns, initargs=(self._fd, os.CLONE_NEWNET))

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)


@dataclass
class ServiceContainer:
    engine: DockerEngine
    id: str
    pid: int  # PID 1 of the container, as the host sees it
    port: int
    netns: NetworkNamespace

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5) -> httpx.Response:
        return self.netns.call(httpx.get, self.url + path, timeout=timeout)

    def predict(self, body: dict, timeout: float = 30) -> Future:
        """POST /predict from inside the namespace; returns at once with the future response."""
        return self.netns.submit(httpx.post, self.url + "/predict", json=body, timeout=timeout)

    def wait_ready(self, timeout: float = 120) -> dict:
        def ready() -> dict | None:
            self.check_running()
            with contextlib.suppress(httpx.TransportError):
                body = self.get("/health", timeout=2).json()
                return body if body["model_loaded"] else None
            return None

        return wait_for(ready, timeout, interval=0.2, what=f"/health of container {self.id[:12]} to report model_loaded")

    def check_running(self) -> None:
        state = self.engine.docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.id).stdout.split()
        if state[0] != "running":
            raise RuntimeError(f"container exited ({' '.join(state)}):\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        done = self.engine.docker("logs", self.id, check=False)
        return done.stdout + done.stderr

    def process_status(self) -> dict[str, str]:
        """/proc/<pid>/status of the container's PID 1, read from the host."""
        lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        return dict(line.split(":\t", 1) for line in lines if ":\t" in line)

    def command_line(self) -> list[str]:
        return Path(f"/proc/{self.pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


@contextlib.contextmanager
def service_container(
    engine: DockerEngine, image: str, model: Path, env: dict[str, str], log_dir: Path, port: int = 8080
) -> Iterator[ServiceContainer]:
    """The image running with MODEL_URI at a storage emulator that holds `model`; removed by ID at exit.

    The container starts first and retries storage (as on a platform where storage is slow to answer); the
    emulator comes up in its namespace a moment later and is seeded there.
    """
    if os.geteuid() != 0:
        missing_tool("reaching a container through its network namespace needs root (setns)")
    bucket, name = "image-tests", f"models/{model.name}"
    env = {"MODEL_URI": f"gs://{bucket}/{name}", "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{EMULATOR_PORT}", **env}
    # A read-only root with only /tmp writable: proof the service writes nowhere else.
    run = ["run", "--detach", "--network", "none", "--read-only", "--tmpfs", "/tmp"]
    for key, value in env.items():
        run += ["--env", f"{key}={value}"]
    container_id = engine.docker(*run, image).stdout.strip()
    netns = emulator_process = None
    try:
        pid = int(engine.docker("inspect", "--format", "{{.State.Pid}}", container_id).stdout)
        netns = NetworkNamespace(pid)
        emulator_process = netns.call(_start_emulator, log_dir / "emulator.log")
        wait_for(lambda: netns.call(_port_open, EMULATOR_PORT), 30, what="storage emulator in the container's namespace")
        netns.call(StorageEmulator(EMULATOR_PORT, emulator_process).upload, bucket, name, model)
        yield ServiceContainer(engine, container_id, pid, port, netns)
    finally:
        if emulator_process:
            stop(emulator_process)
        if netns:
            netns.close()
        engine.docker("rm", "--force", container_id, check=False)


def _start_emulator(log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(EMULATOR_PORT), "--in-memory", "--quiet"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False
