"""SIGTERM under a burst, on the stack the service ships (gunicorn + uvicorn-worker + uvloop + httptools): every
request whose bytes reached the service before it stopped listening is answered, none is reset (issue 16)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tests.support.models import busy_model
from tests.support.server import run_service

BURST = 64
ROWS = 5000
FEATURES = 16  # a burst takes about 1.5 s to answer here: the signal comes in the middle of it
GRACEFUL_TIMEOUT = 8
DELAYS = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.3, 0.4, 0.5] * 3  # 36 bursts, 0.2-0.6 s


@dataclass
class Burst:
    statuses: list[int] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # the request went out, and no answer came back
    refused: list[str] = field(default_factory=list)  # no connection: nothing was sent
    lock: threading.Lock = field(default_factory=threading.Lock)


def _request(port: int, body: bytes) -> bytes:
    head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def _send_one(port: int, request: bytes, burst: Burst, start: float) -> None:
    """One request on its own connection, opened at `start`, as a platform's proxy sends it; records the status,
    or the loss when the connection was made and no answer came back."""
    time.sleep(max(0.0, start - time.monotonic()))
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    except OSError as exc:  # refused: the service had stopped listening, the request never went out
        with burst.lock:
            burst.refused.append(f"{type(exc).__name__}: {exc}")
        return
    with conn:
        try:
            conn.sendall(request)
            answer = b""
            while b"\r\n" not in answer:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("closed without an answer")
                answer += chunk
        except OSError as exc:
            with burst.lock:
                burst.lost.append(f"{type(exc).__name__}: {exc}")
            return
    with burst.lock:
        burst.statuses.append(int(answer.split(b" ", 2)[1]))


def _burst(tmp_path, model: str, delay: float, request_bytes: bytes) -> tuple[Burst, int, float]:
    with run_service(model, tmp_path, GRACEFUL_TIMEOUT=str(GRACEFUL_TIMEOUT), ORT_INTRA_OP_THREADS="1") as service:
        service.wait_state("ready", timeout=60)
        burst = Burst()
        request = _request(service.port, request_bytes)
        # Half the burst at once, the other half spread up to the signal: some connections are still in the
        # listen backlog or half read when it comes.
        now = time.monotonic() + 0.05
        starts = [now] * (BURST // 2) + [now + delay * i / (BURST // 2) for i in range(BURST - BURST // 2)]
        threads = [threading.Thread(target=_send_one, args=(service.port, request, burst, start)) for start in starts]
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, now + delay - time.monotonic()))
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)  # the master only, as Cloud Run and Fly signal PID 1
        service.process.wait(GRACEFUL_TIMEOUT + 5)
        took = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    return burst, service.process.returncode, took


def test_sigterm_during_a_burst_loses_no_request(tmp_path):
    model = str(busy_model(tmp_path / "busy.onnx", n_in=FEATURES, hidden=1024))
    rows = np.random.default_rng(0).standard_normal((ROWS, FEATURES)).round(4).tolist()
    body = json.dumps({"inputs": {"features": rows}}).encode()
    lost, answered, report = 0, 0, []
    for run, delay in enumerate(DELAYS):
        burst, code, took = _burst(tmp_path, model, delay, body)
        lost += len(burst.lost)
        answered += len(burst.statuses)
        report.append(f"run {run} delay {delay}s: {len(burst.statuses)} answered "
                      f"{sorted(set(burst.statuses))}, {len(burst.lost)} lost, {len(burst.refused)} refused, exit {code} in {took:.2f}s")
        assert code == 0, report[-1]
        assert took < GRACEFUL_TIMEOUT, report[-1]
        assert set(burst.statuses) <= {200, 503}, report[-1]
    print("\n".join(report) + f"\n{len(DELAYS)} bursts: {answered} answered, {lost} lost")
    assert lost == 0, "\n".join(report)
