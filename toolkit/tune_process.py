"""`invoke tune` without a Docker engine: the service from this checkout under gunicorn, each shape in a cgroup of
its own with the shape's CPU quota, CPUs and memory limit (as root), or, with --unconfined, on this machine as it
is (every figure then says so). Same interface as tune.Containers, so the sweep does not know which it drives."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CGROUP = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory")


class CgroupUnavailable(Exception):
    pass


def cgroup_version() -> int:
    return 2 if (CGROUP / "cgroup.controllers").is_file() else 1


class Cgroup:
    """One cgroup (v2), or one directory per controller (v1), made by this run and removed after it."""

    def __init__(self, name: str):
        self.name = name
        self.version = cgroup_version()
        self.dirs: list[Path] = []
        try:
            if self.version == 2:
                control = (CGROUP / "cgroup.subtree_control").read_text().split()
                wanted = [c for c in ("cpu", "cpuset", "memory") if c not in control]
                if wanted:
                    (CGROUP / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
                self._make(CGROUP / name)
            else:
                for controller in V1_CONTROLLERS:
                    self._make(CGROUP / controller / name)
                cpuset = CGROUP / "cpuset" / name
                (cpuset / "cpuset.mems").write_text((CGROUP / "cpuset" / "cpuset.mems").read_text())
        except OSError as exc:
            self.remove()
            raise CgroupUnavailable(f"cannot make a cgroup under {CGROUP} ({exc.strerror or exc})") from None

    def _make(self, path: Path) -> None:
        path.mkdir()
        self.dirs.append(path)

    def _file(self, controller: str, v1: str, v2: str) -> Path:
        return (CGROUP / self.name / v2) if self.version == 2 else (CGROUP / controller / self.name / v1)

    def limit(self, cpus: list[int], memory: int, quota_us: int, period_us: int) -> None:
        self._file("cpuset", "cpuset.cpus", "cpuset.cpus").write_text(",".join(map(str, cpus)))
        self._file("memory", "memory.limit_in_bytes", "memory.max").write_text(str(memory))
        self.cpu(quota_us, period_us)

    def cpu(self, quota_us: int, period_us: int) -> None:
        if self.version == 2:
            (CGROUP / self.name / "cpu.max").write_text(f"{quota_us} {period_us}")
        else:
            (CGROUP / "cpu" / self.name / "cpu.cfs_period_us").write_text(str(period_us))
            (CGROUP / "cpu" / self.name / "cpu.cfs_quota_us").write_text(str(quota_us))

    def join(self) -> None:
        """Put the calling process in (run in the child before exec, so that gunicorn starts inside)."""
        for path in self.dirs:
            (path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for path in reversed(self.dirs):
            for _ in range(50):  # the processes may take a moment to leave it
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self.dirs = []


class Processes:
    """gunicorn per shape, by name; `remove_all` stops every one and removes its cgroup on every exit path."""

    def __init__(self, run_id: str, root: Path, work: Path, confined: bool):
        self.run_id, self.root, self.work, self.confined = run_id, root, work, confined
        self.running: dict[str, tuple[subprocess.Popen, Cgroup | None, Path]] = {}
        self.count = 0

    def start(self, plan: Any, model: Any, shape: Any, placement: Any, port: int, network: str) -> str:
        self.count += 1
        name = f"onnx-serve-tune-{self.run_id}-{self.count}"
        group = Cgroup(name) if self.confined else None
        if group:
            group.limit(placement.container_cpus, shape.memory_bytes,
                        len(placement.container_cpus) * shape.cpu_period_us, shape.cpu_period_us)  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in {"MODEL_SHA256", "API_KEYS", "WEB_CONCURRENCY"}}
        env.update(MODEL_URI=str(model.folder / model.file_name), MODEL_SHA256=model.sha256, HOST="127.0.0.1",
                   PORT=str(port), WEB_CONCURRENCY="1", METRICS_PORT="0",
                   ORT_INTRA_OP_THREADS=str(len(placement.container_cpus)),
                   MODEL_CACHE_DIR=str(self.work / f"{name}-cache"))  # fmt: skip
        cpus = placement.container_cpus

        def enter() -> None:
            os.sched_setaffinity(0, cpus)
            if group:
                group.join()

        log = self.work / f"{name}.log"
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        with open(log, "wb") as out:
            process = subprocess.Popen([gunicorn, "-c", "service/gunicorn.conf.py", "service.app:app"], cwd=self.root,
                                       env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=enter)  # fmt: skip
        self.running[name] = (process, group, log)
        return name

    def limit(self, name: str, shape: Any, placement: Any) -> None:
        group = self.running[name][1]
        if group:
            group.cpu(round(placement.quota_cpus * shape.cpu_period_us), shape.cpu_period_us)

    def pid(self, name: str) -> int:
        return self.running[name][0].pid

    def state(self, name: str) -> dict[str, Any]:
        process = self.running[name][0]
        return {"Status": "running" if process.poll() is None else "exited", "OOMKilled": False}

    def logs(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.running[name][2].read_text(errors="replace").splitlines()[-30:])
        return ""

    def remove(self, name: str) -> None:
        process, group, _ = self.running.pop(name, (None, None, None))
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        if group:
            group.remove()

    def remove_all(self) -> None:
        for name in list(self.running):
            self.remove(name)
