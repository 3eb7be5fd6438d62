"""The service as deployed: a real gunicorn master with Uvicorn workers on 127.0.0.1, loading real ONNX models
through the real google-cloud-storage client from gcp-storage-emulator, or from a local path."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.support.external import missing_tool
from tests.support.models import linear_model, reference_outputs, slow_model
from tests.support.ports import free_port
from tests.support.server import GUNICORN, ROOT, run_service, service_env
from tests.support.storage_emulator import storage_emulator
from tests.support.waiting import wait_for

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [0.0, -1.0, 2.5, 100.0]]


def assert_predicts_like_onnxruntime(service, model_path, rows=ROWS):
    response = service.predict({"inputs": {"features": rows}})
    assert response.status_code == 200, response.text
    expected = reference_outputs(model_path, {"features": np.array(rows, np.float32)})
    got = response.json()["outputs"]
    for name, value in zip(got, expected):
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


@pytest.mark.slow
def test_loads_from_gcs_goes_from_503_to_200_and_predicts_like_onnxruntime(emulator, demo_model, tmp_path):
    generation = emulator.upload("models-ok", "demo/model.onnx", demo_model)
    digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
    # The first download waits for the emulator only through the service's retries: slow it with a delay
    # so that /health is seen answering 503 before the model is in.
    with run_service("gs://models-ok/demo/model.onnx", tmp_path, MODEL_SHA256=digest, **emulator.env) as service:
        status, body = service.wait_answering()
        assert (status == 503 and body["model_loaded"] is False) or (status == 200 and body["model_loaded"])
        body = service.wait_state("ready")
        status, body = service.health()
        assert status == 200
        assert body["model"] == {
            "uri": "gs://models-ok/demo/model.onnx", "generation": generation, "sha256": digest,
            "size_bytes": demo_model.stat().st_size, "data_files": [],
        }
        size = demo_model.stat().st_size
        assert body["progress"] == {"bytes_done": size, "bytes_total": size, "files": 1, "files_done": 1}
        assert body["load_seconds"] > 0 and body["error"] is None and body["warnings"] == []
        assert_predicts_like_onnxruntime(service, demo_model)


@pytest.mark.slow
def test_health_is_503_while_loading(emulator, tmp_path):
    # Storage comes up 3 s after the service: meanwhile /health answers at once, with 503 and the step.
    port = free_port()
    with run_service("gs://late/model.onnx", tmp_path, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}") as service:
        body = service.wait_health(lambda body: body["step"] != "starting", what="the load to begin")
        assert service.health()[0] == 503
        assert (body["status"], body["model_loaded"], body["step"]) == ("loading", False, "downloading")
        refused = service.predict({"inputs": [[1, 2, 3, 4]]})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "still loading" in refused.json()["detail"]
        model = linear_model(tmp_path / "late.onnx")
        time.sleep(3)
        assert service.health()[0] == 503
        with storage_emulator(port) as late:
            late.upload("late", "model.onnx", model)
            service.wait_state("ready", timeout=60)
            assert_predicts_like_onnxruntime(service, model)
        retries = [line for line in service.log_lines() if "retrying" in line.get("message", "")]
        assert retries and retries[0]["severity"] == "WARNING"


@pytest.mark.slow
def test_loads_from_a_local_path(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path) as service:
        service.wait_state("ready")
        assert service.health()[1]["model"]["generation"] is None
        assert_predicts_like_onnxruntime(service, demo_model)


@pytest.mark.slow
def test_a_pinned_generation_is_served_and_no_other(emulator, tmp_path):
    old = emulator.upload("models-pin", "model.onnx", linear_model(tmp_path / "v1.onnx", seed=1))
    current_model = linear_model(tmp_path / "v2.onnx", seed=2)
    current = emulator.upload("models-pin", "model.onnx", current_model)
    with run_service(f"gs://models-pin/model.onnx#{current}", tmp_path, **emulator.env) as service:
        service.wait_state("ready")
        assert service.health()[1]["model"]["generation"] == current
        assert_predicts_like_onnxruntime(service, current_model)
    # The emulator keeps no old generations (like a bucket without versioning): the old pin must not load.
    with run_service(f"gs://models-pin/model.onnx#{old}", tmp_path, **emulator.env) as service:
        body = service.wait_state("failed")
        assert f"#{old} does not exist" in body["error"]


FAILURES = {
    "missing object": ("missing/model.onnx", {}, ["does not exist", "MODEL_URI"]),
    "checksum mismatch": ("models-fail/good.onnx", {"MODEL_SHA256": "0" * 64}, ["sha256 mismatch", "MODEL_SHA256"]),
    "not an onnx file": ("models-fail/corrupt.onnx", {}, ["not a model onnxruntime can open"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FAILURES)
def test_failed_load_never_reports_loaded_and_gives_the_reason(case, emulator, demo_model, tmp_path):
    emulator.upload("models-fail", "good.onnx", demo_model)
    emulator.upload("models-fail", "corrupt.onnx", b"\x08\x07garbage that is not an onnx protobuf")
    name, env, fragments = FAILURES[case]
    with run_service(f"gs://{name}", tmp_path, **env, **emulator.env) as service:
        body = service.wait_state("failed")
        status, body = service.health()
        assert status == 503 and body["model_loaded"] is False
        for fragment in fragments:
            assert fragment in body["error"]
        assert service.predict({"inputs": [[1, 2, 3, 4]]}).status_code == 503
        # /health says failed a moment before the worker logs why
        service.wait_log(lambda lines: any(line.get("severity") == "ERROR" and fragments[0] in line["message"]
                                           for line in lines), what=f"an ERROR line with {fragments[0]!r}")


@pytest.mark.slow
def test_storage_never_reachable_fails_after_the_deadline(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with run_service("gs://nowhere/model.onnx", tmp_path, STORAGE_EMULATOR_HOST=dead, MODEL_LOAD_DEADLINE="3") as service:
        body = service.wait_state("failed", timeout=30)
        assert "not reachable for 3s" in body["error"] and "MODEL_LOAD_DEADLINE" in body["error"]


@pytest.mark.slow
def test_failed_load_exits_the_process_so_the_platform_replaces_it(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with run_service(str(bad), tmp_path, EXIT_ON_LOAD_FAILURE_AFTER="1") as service:
        service.process.wait(30)
        assert service.process.returncode == 3  # gunicorn halts on "Worker failed to boot" instead of respawning
        assert "failed to load" in service.raw_log()


@pytest.mark.slow
def test_bad_input_gets_4xx_and_the_worker_keeps_serving(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path) as service:
        service.wait_state("ready")
        bad = [b"{not json", b'{"inputs": [[1, 2]]}', b'{"inputs": [["x", 1, 2, 3]]}', b'{"inputs": {"nope": []}}']
        for body in bad:
            response = service.predict(body)
            assert 400 <= response.status_code < 500 and response.json()["detail"]
        assert service.predict(b"x" * (17 * 1024 * 1024)).status_code == 413
        assert_predicts_like_onnxruntime(service, demo_model)
        assert "Traceback" not in service.raw_log()


@pytest.mark.slow
def test_200_concurrent_requests_all_answer_correctly(demo_model, tmp_path):
    rng = np.random.default_rng(7)
    requests = [rng.normal(size=(1 + i % 5, 4)).round(3).tolist() for i in range(200)]
    with run_service(str(demo_model), tmp_path) as service:
        service.wait_state("ready")
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        with httpx.Client(limits=limits, timeout=60) as client, ThreadPoolExecutor(200) as pool:
            responses = list(pool.map(lambda rows: client.post(service.url + "/predict", json={"inputs": rows}), requests))
    assert [r.status_code for r in responses] == [200] * 200
    for rows, response in zip(requests, responses):
        expected = reference_outputs(demo_model, {"features": np.array(rows, np.float32)})[1]
        np.testing.assert_allclose(response.json()["outputs"]["probabilities"], expected, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish_and_exits_0(tmp_path):
    model = slow_model(tmp_path / "slow.onnx")  # about 1.5 s an inference
    with run_service(str(model), tmp_path, ORT_INTRA_OP_THREADS="1", INFERENCE_THREADS="4") as service:
        service.wait_state("ready", timeout=60)
        results = []
        threads = [
            threading.Thread(target=lambda x=x: results.append((x, service.predict({"inputs": [[x]]}))))
            for x in (1.0, 2.0, 3.0)
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: service.connections() >= 3, 30, what="the 3 requests to reach the service")
        time.sleep(0.5)  # and to be read: in flight
        sent = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(15)
        elapsed = time.monotonic() - sent
        for thread in threads:
            thread.join(10)
    assert service.process.returncode == 0
    assert elapsed < 10  # Cloud Run's SIGTERM-to-SIGKILL window
    assert sorted((x, r.status_code, r.json()["outputs"]["y"][0][0]) for x, r in results) == [
        (1.0, 200, 1.0), (2.0, 200, 2.0), (3.0, 200, 3.0)
    ]


def test_logs_are_json_lines_with_severity_and_the_cloud_run_trace(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path, GOOGLE_CLOUD_PROJECT="my-proj", ACCESS_LOG="all") as service:
        service.wait_state("ready")
        trace = "105445aa7843bc8bf206b12000100000"
        service.predict({"inputs": [[1, 2, 3, 4]]}, headers={"X-Cloud-Trace-Context": f"{trace}/1;o=1"})
        time.sleep(0.2)
    lines = service.raw_log().splitlines()
    parsed = service.log_lines()
    assert len(parsed) == len(lines) and parsed, "every line is one JSON object"
    assert all(line["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"} and "message" in line for line in parsed)
    access = [line for line in parsed if line.get("httpRequest", {}).get("requestUrl") == "/predict"]
    assert access[0]["httpRequest"]["status"] == 200
    assert access[0]["logging.googleapis.com/trace"] == f"projects/my-proj/traces/{trace}"
    assert any(line["message"].startswith("Starting gunicorn") for line in parsed)


@pytest.mark.slow
def test_workers_share_one_download(emulator, demo_model, tmp_path):
    emulator.upload("models-shared", "model.onnx", demo_model)
    cache = tmp_path / "cache"
    with run_service("gs://models-shared/model.onnx", tmp_path, WEB_CONCURRENCY="2", MODEL_CACHE_DIR=str(cache),
                     **emulator.env) as service:
        service.wait_state("ready")
        lines = service.wait_log(lambda lines: sum(line["message"].startswith("model loaded in") for line in lines) >= 2,
                                 what="both workers to log their load")
        messages = [line["message"] for line in lines]
    assert messages.count("model loaded in") == 0  # formatted with the time
    assert sum(m.startswith("model loaded in") for m in messages) == 2
    assert messages.count("model found in cache") == 1
    assert len(list(cache.rglob("*.onnx"))) == 1


@pytest.mark.parametrize(
    "env, fragment",
    [({"MODEL_URI": ""}, "MODEL_URI is not set"), ({"PORT": "eighty"}, "PORT: ")],
)
def test_bad_configuration_stops_start_up_with_a_message(env, fragment, demo_model, tmp_path):
    full = service_env(str(demo_model), free_port())
    full.update(env)
    result = subprocess.run(GUNICORN, cwd=ROOT, env=full, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_port_unset_listens_on_all_interfaces_port_8080(demo_model, tmp_path):
    """In a network namespace of its own (so nothing outside loopback sees it), as a platform would run it."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        missing_tool("a private network namespace needs root, unshare (util-linux) and ip (iproute2)")
    env = service_env(str(demo_model), 0)
    del env["PORT"], env["HOST"], env["METRICS_PORT"]
    gunicorn = " ".join(GUNICORN)
    script = f"""
set -e
ip link set lo up
{gunicorn} > {tmp_path}/service.log 2>&1 &
pid=$!
{sys.executable} - <<'PY'
import json, time, urllib.request
for _ in range(300):
    try:
        answer = json.load(urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=1))
        if answer["model_loaded"]:
            break
    except OSError:
        pass
    time.sleep(0.1)
print("HEALTH", json.dumps(answer))
PY
ss -ltnH
kill -TERM $pid
wait $pid
"""
    result = subprocess.run(["unshare", "--net", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0, result.stderr + (tmp_path / "service.log").read_text()
    assert '"model_loaded": true' in result.stdout
    listening = [line.split()[3] for line in result.stdout.splitlines() if line.startswith("LISTEN")]
    assert sorted(listening) == ["0.0.0.0:8080", "0.0.0.0:9091"]  # the service, and its metrics (METRICS_PORT)
