"""The real service in a 2 GiB memory cgroup (v1, created here as root) under 128 concurrent 16 MB bodies: the
worker stays under the limit, nothing is OOM-killed, every request gets 200 or a 503 that says why (issue 16)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.external import missing_tool
from tests.support.models import ROOT, linear_model
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.waiting import wait_for
from tests.support.server import GUNICORN, Service, service_env

LIMIT = 2 * 1024**3
BODIES = 128
BODY_BYTES = 16_000_000  # under MAX_BODY_BYTES (16 MiB)
FEATURES = 16
V1_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def memory_cgroup():
    """A fresh v1 memory cgroup limited to 2 GiB, removed after the test."""
    if os.geteuid() != 0 or not (V1_MEMORY / "cgroup.procs").is_file() or not os.access(V1_MEMORY, os.W_OK):
        missing_tool("needs root and a writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory to make a "
                     "2 GiB cgroup")
    group = V1_MEMORY / f"onnx-serve-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
    except OSError as exc:
        missing_tool(f"cannot create a memory cgroup under {V1_MEMORY}: {exc}")
    try:
        yield group
    finally:
        for _ in range(50):  # the processes are gone once stop() returned; the kernel may take a moment
            try:
                group.rmdir()
                break
            except OSError:
                threading.Event().wait(0.1)


def _body() -> bytes:
    """A /predict body of 16-feature rows (about 120 bytes a row), padded with spaces to exactly BODY_BYTES."""
    values = np.random.default_rng(0).uniform(-1, 1, (BODY_BYTES // 121, FEATURES)).round(4).tolist()
    body = json.dumps({"inputs": {"features": values}}, separators=(",", ":")).encode()
    assert len(body) <= BODY_BYTES
    return body + b" " * (BODY_BYTES - len(body))


def _post(port: int, body: bytes, answers: list, lock: threading.Lock) -> None:
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=300) as conn:
            conn.sendall(head + body)
            answer = b""
            while chunk := conn.recv(1 << 20):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        text = answer.partition(b"\r\n\r\n")[2].decode(errors="replace")
        retry = b"\r\nretry-after:" in answer.partition(b"\r\n\r\n")[0].lower()
        result = (status, text, retry)
    except (OSError, IndexError, ValueError) as exc:
        result = (0, f"{type(exc).__name__}: {exc}", False)
    with lock:
        answers.append(result)


def _worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


# 1 worker; 3 workers share the container's limit (before the budget: 2 of them OOM-killed, 77 requests lost).
@pytest.mark.slow  # a cgroup run: 128 bodies of 16 MB
@pytest.mark.xdist_group("heavy")  # one heavy test at a time under pytest -n
@pytest.mark.parametrize("workers", [1, 3])
def test_128_concurrent_16_mb_bodies_in_a_2_gib_cgroup_kill_nothing(workers, memory_cgroup, tmp_path):
    model = linear_model(tmp_path / "wide.onnx", n_in=FEATURES)
    body = _body()
    port = free_port()
    env = service_env(str(model), port, ORT_INTRA_OP_THREADS="1", MAX_BODY_BYTES=str(16 * 1024 * 1024),
                      WEB_CONCURRENCY=str(workers))
    log_path = tmp_path / "service.log"
    # The service starts inside the cgroup (its master writes itself in before exec), as in a container.
    command = ["sh", "-c", f'echo $$ > {memory_cgroup}/cgroup.procs && exec "$@"', "sh", *GUNICORN]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    service = Service(process, port, log_path)
    try:
        health = service.wait_state("ready", timeout=120)
        first = wait_for(lambda: len(_worker_pids(process.pid)) == workers and _worker_pids(process.pid), 60,
                         what=f"{workers} workers")
        wait_for(lambda: sum("memory budget for requests in flight" in line.get("message", "")
                             for line in service.log_lines()) == workers, 120, what="every worker's budget")
        memory = health["memory"]
        assert memory["limit_bytes"] == LIMIT and "cgroup v1" in memory["limit_source"], memory
        assert 0 < memory["budget_bytes"] < LIMIT - memory["baseline_bytes"]
        def budget_gauges():  # set just after the budget is logged
            text = httpx.get(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", timeout=5).text
            found = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("onnx_serve_memory"))
            return "onnx_serve_memory_budget_bytes" in found and float(found["onnx_serve_memory_budget_bytes"]) > 0 and found

        gauges = wait_for(budget_gauges, 30, what="the memory gauges on /metrics")
        assert float(gauges["onnx_serve_memory_limit_bytes"]) == LIMIT, gauges
        assert float(gauges["onnx_serve_memory_budget_bytes"]) > 0, gauges

        answers, lock = [], threading.Lock()
        threads = [threading.Thread(target=_post, args=(port, body, answers, lock)) for _ in range(BODIES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)

        statuses = sorted(status for status, _, _ in answers)
        summary = {status: statuses.count(status) for status in set(statuses)}
        peak = max(int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) * 1024 for pid in first)
        max_usage = int((memory_cgroup / "memory.max_usage_in_bytes").read_text())
        oom_control = (memory_cgroup / "memory.oom_control").read_text()
        print(f"\n{workers} worker(s), {len(body)}-byte bodies: answers {summary}; largest worker peak RSS "
              f"{peak / 2**20:.0f} MiB; cgroup peak "
              f"{max_usage / 2**20:.0f} MiB of {LIMIT / 2**20:.0f}; budget {memory['budget_bytes'] / 2**20:.0f} MiB")
        assert set(summary) <= {200, 503}, [text for status, text, _ in answers if status not in (200, 503)][:3]
        assert summary.get(200, 0) > 0
        for status, text, retry in answers:
            if status == 503:
                assert retry and "memory" in text and "retry" in text, text
        assert _worker_pids(process.pid) == first, "a worker was replaced"
        assert "oom_kill 0" in oom_control or "oom_kill" not in oom_control, oom_control
        assert peak < LIMIT and max_usage < LIMIT
        # a request's hold is released just after its answer is sent: the last ones may still be on their way out
        after = service.wait_health(lambda body: body["memory"]["in_use_bytes"] == 0, 10, what="every hold released")
        assert after["model_loaded"] and after["memory"]["in_use_bytes"] == 0
    finally:
        stop(process)
