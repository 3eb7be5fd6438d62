"""A Docker engine for the image tests: the one already answering, or a private dockerd started for the run.

The private engine keeps everything (images, containers, its containerd, its socket) under one temporary
directory, so a run leaves nothing behind. It has no bridge network: containers run with `--network none`
(the tests reach them through their network namespace) and builds use `--network host`, so no test traffic
goes to the docker bridge's private addresses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.support.debian_packages import ensure_installed
from tests.support.external import missing_tool
from tests.support.mounts import unmount_under

START_TIMEOUT = 60.0
STOP_GRACE = 20.0


@dataclass(frozen=True)
class DockerEngine:
    """How to reach one engine: `host` is its DOCKER_HOST; `docker(...)` runs the CLI against it."""

    host: str
    started_here: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`docker {' '.join(args)}` failed ({done.returncode}):\n{done.stderr.strip()[-3000:]}")
        return done


@contextlib.contextmanager
def docker_engine() -> Iterator[DockerEngine]:
    """Yield an answering engine: $DOCKER_HOST or the default socket, else a private dockerd (root, Debian)."""
    ensure_installed("docker", "docker.io")
    existing = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if _answers(existing):
        yield DockerEngine(existing)
        return
    if os.geteuid() != 0:
        missing_tool(f"no Docker engine answers at {existing}, and starting one needs root")
    dockerd = ensure_installed("dockerd", "docker.io")
    with tempfile.TemporaryDirectory(prefix="onnx-serve-dockerd-") as workdir:
        with _private_dockerd(dockerd, Path(workdir)) as host:
            yield DockerEngine(host, started_here=True)


@contextlib.contextmanager
def _private_dockerd(dockerd: str, workdir: Path) -> Iterator[str]:
    host = f"unix://{workdir}/docker.sock"
    log_path = workdir / "dockerd.log"
    command = [
        dockerd,
        f"--data-root={workdir}/data",
        f"--exec-root={workdir}/exec",
        f"--pidfile={workdir}/dockerd.pid",
        f"--host={host}",
        "--bridge=none",  # no docker0: nothing may send traffic to its private range
        "--iptables=false",
        "--ip6tables=false",
        "--log-level=warn",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_answering(host, process, log_path)
        yield host
    finally:
        _stop(process)
        unmount_under(workdir)


def _answers(host: str) -> bool:
    env = {**os.environ, "DOCKER_HOST": host}
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], env=env, capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _wait_until_answering(host: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(host):
        if process.poll() is not None or time.monotonic() > deadline:
            reason = f"exited with {process.returncode}" if process.poll() is not None else f"silent for {START_TIMEOUT:.0f}s"
            tail = log_path.read_text(errors="replace")[-2000:]
            missing_tool(f"the private dockerd {reason}; its log ends:\n{tail}")
        time.sleep(0.3)


def _stop(process: subprocess.Popen) -> None:
    """TERM dockerd (it stops its containers and its containerd), wait, then KILL the whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a containerd or shim left behind by a dockerd that did not finish
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
