"""An answer sent before the request's body is read (the 401 of a missing API key, a 413 over MAX_BODY_BYTES, a
404) reaches the client over a real socket, never a connection reset, on kept-alive and closing connections alike
(issue 22; the lingering close in service/worker.py). A real gunicorn on 127.0.0.1, 1 MB bodies, many rounds."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.support.models import DEMO_MODEL
from tests.support.server import read_answer, run_service

KEY = "k1-Zq9vX2mB7tLr4sW8yN3pHc6dF"
MAX_BODY = 512 * 1024
ROUNDS = 8
ROW = b"[5.1, 3.5, 1.4, 0.2]"
BODY = b'{"inputs": [' + b", ".join([ROW] * 52_000) + b"]}"  # 1.1 MB, a valid body for the demo model
SMALL = b'{"inputs": [' + ROW + b"]}"
# (what, path, headers, body, status, field of the error body)
EARLY = [
    ("401, no key", "/predict", {}, BODY, 401, "detail"),
    ("401, wrong key, V2", "/v2/models/demo/infer", {"X-API-Key": "not-the-key-0123456789"}, BODY, 401, "error"),
    ("413, over MAX_BODY_BYTES", "/predict", {"X-API-Key": KEY}, BODY, 413, "detail"),
    ("404, no such route", "/no-such-route", {"X-API-Key": KEY}, BODY, 404, "detail"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with run_service(str(DEMO_MODEL), tmp_path_factory.mktemp("early"), API_KEYS=KEY,
                     MAX_BODY_BYTES=str(MAX_BODY)) as running:  # fmt: skip
        running.wait_state("ready")
        yield running


def send(conn: socket.socket, path: str, headers: dict[str, str], body: bytes) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    conn.sendall((head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body)


def answer(conn: socket.socket) -> tuple[int, bytes, dict]:
    status, head, body = read_answer(conn)
    return status, head, json.loads(body)


@pytest.mark.parametrize("what, path, headers, body, status, field", EARLY, ids=[case[0] for case in EARLY])
def test_an_early_answer_on_a_kept_alive_connection_arrives_and_the_connection_serves_the_next_request(
    service, what, path, headers, body, status, field
):
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
            send(conn, path, headers, body)
            got, _, error = answer(conn)
            assert got == status and error[field], (what, got, error)
            send(conn, "/predict", {"X-API-Key": KEY}, SMALL)  # the rest of the big body was skipped, not parsed
            got, _, result = answer(conn)
            assert got == 200 and len(result["outputs"]["probabilities"]) == 1, result


@pytest.mark.parametrize("what, path, headers, body, status, field", EARLY, ids=[case[0] for case in EARLY])
def test_an_early_answer_on_a_closing_connection_arrives_then_the_connection_ends_without_a_reset(
    service, what, path, headers, body, status, field
):
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
            send(conn, path, {**headers, "Connection": "close"}, body)
            got, head, error = answer(conn)  # before the fix: ConnectionResetError, or the body's send failing
            assert got == status and error[field] and b"connection: close" in head, (what, got, error)
            assert conn.recv(65536) == b""  # an orderly end (FIN), not a reset


def test_httpx_sending_a_large_body_without_a_key_reads_the_401(service):
    for _ in range(ROUNDS):
        for headers in ({}, {"Connection": "close"}):
            response = httpx.post(service.url + "/predict", content=BODY, headers=headers, timeout=30)
            assert response.status_code == 401 and "API key" in response.json()["detail"]


def test_a_memory_budget_refusal_on_a_closing_connection_arrives_without_a_reset(tmp_path):
    # 64 MiB is less than the worker holds once loaded: a budget of 0, so every body gets the budget's 413.
    with run_service(str(DEMO_MODEL), tmp_path, MEMORY_LIMIT_BYTES=str(64 * 1024 * 1024)) as running:
        running.wait_state("ready")
        for _ in range(ROUNDS):
            with socket.create_connection(("127.0.0.1", running.port), timeout=30) as conn:
                send(conn, "/predict", {"Connection": "close"}, BODY)
                got, _, error = answer(conn)
                assert got == 413 and "budget for requests in flight" in error["detail"], error
                assert conn.recv(65536) == b""
        assert running.health()[1]["memory"]["in_use_bytes"] == 0


@pytest.mark.slow
def test_a_client_that_stops_sending_its_body_is_closed_after_the_idle_bound(service):
    from service.worker import LINGER_IDLE_SECONDS

    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(BODY)}\r\n"
                "Connection: close\r\n\r\n").encode()  # fmt: skip
        conn.sendall(head + BODY[:100_000])
        got, _, error = answer(conn)
        assert got == 401 and conn.recv(65536) == b""  # the answer, then the server's FIN
        time.sleep(LINGER_IDLE_SECONDS / 2)
        conn.sendall(BODY[100_000:200_000])  # still read and dropped: within the bound
        time.sleep(LINGER_IDLE_SECONDS / 2 + 0.5)
        conn.sendall(BODY[200_000:300_000])  # not within it: the connection was closed a moment ago
        with pytest.raises(OSError):  # the kernel's reset of a closed socket, on the next send at the latest
            for _ in range(50):
                conn.sendall(b" " * 65536)
                time.sleep(0.02)
