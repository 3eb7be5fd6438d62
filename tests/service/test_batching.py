"""Adaptive batching under real gunicorn: concurrent clients get exactly what each would get alone, unsafe models
are never batched, one request's bad input never fails another, and /health answers under full load."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from bench.loadgen import request_bytes, run_load
from service.settings import SettingsError, load_settings
from tests.support.models import (
    batch_mixing_model, busy_model, image_model, linear_model, lookup_model, reference_outputs, two_input_model,
)  # fmt: skip
from tests.support.waiting import wait_for
from tests.support.server import run_service


def post_concurrently(service, bodies: list[dict]) -> list[httpx.Response]:
    """Every body at once, from as many threads, over one connection each."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    with httpx.Client(limits=limits, timeout=60) as client, ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post(service.url + "/predict", json=body), bodies))


def batching(service) -> dict:
    return service.health()[1]["batching"]


def assert_each_answer_is_its_own(model, name: str, bodies: list[dict], responses: list[httpx.Response]) -> None:
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        feeds = {key: np.array(value, np.float32) for key, value in body["inputs"].items()}
        expected = reference_outputs(model, feeds)
        outputs = response.json()["outputs"]
        for output, value in zip(outputs, expected):
            np.testing.assert_allclose(outputs[output], value, rtol=1e-5, atol=1e-6, err_msg=f"{name}: {output}")


def test_concurrent_clients_of_a_batch_safe_model_get_their_own_rows(tmp_path):
    model = linear_model(tmp_path / "linear.onnx", n_in=4, n_out=3)
    rng = np.random.default_rng(1)
    bodies = [{"inputs": {"features": rng.normal(size=(1 + i % 3, 4)).round(4).tolist()}} for i in range(48)]
    # A short delay makes batches certain in a test; without it they form only while a run is busy.
    with run_service(str(model), tmp_path, MAX_BATCH_DELAY_MS="100") as service:
        service.wait_state("ready")
        assert batching(service)["enabled"] is True
        responses = post_concurrently(service, bodies)
        stats = batching(service)["worker"]
    assert_each_answer_is_its_own(model, "linear", bodies, responses)
    assert stats["largest_batch_requests"] > 1, stats  # requests really were run together
    assert stats["requests"] == 48 and stats["runs"] < 48


def test_a_model_that_mixes_rows_is_never_batched_and_says_why(tmp_path):
    model = batch_mixing_model(tmp_path / "mixing.onnx")
    rng = np.random.default_rng(2)
    bodies = [{"inputs": {"x": rng.normal(size=(2, 4)).round(4).tolist()}} for _ in range(24)]
    with run_service(str(model), tmp_path, MAX_BATCH_DELAY_MS="100") as service:
        service.wait_state("ready")
        health = batching(service)
        metadata = httpx.get(service.url + "/metadata").json()["batching"]
        responses = post_concurrently(service, bodies)
        stats = batching(service)["worker"]
    assert health["enabled"] is False and "mixes rows" in health["reason"], health
    assert metadata["enabled"] is False and metadata["reason"] == health["reason"]
    assert_each_answer_is_its_own(model, "mixing", bodies, responses)
    assert stats["largest_batch_requests"] == 1


def test_free_image_sizes_batch_only_with_the_same_size(tmp_path):
    model = image_model(tmp_path / "image.onnx")
    rng = np.random.default_rng(3)
    sizes = [(5, 7), (5, 7), (8, 8), (5, 7), (3, 11), (8, 8)] * 4
    bodies = [{"inputs": {"image": rng.normal(size=(1, 3, h, w)).round(3).tolist()}} for h, w in sizes]
    with run_service(str(model), tmp_path, MAX_BATCH_DELAY_MS="100") as service:
        service.wait_state("ready")
        assert batching(service)["enabled"] is True
        responses = post_concurrently(service, bodies)
        stats = batching(service)["worker"]
    assert_each_answer_is_its_own(model, "image", bodies, responses)
    assert stats["largest_batch_requests"] > 1, stats


def test_a_request_the_model_rejects_fails_alone_in_its_batch(tmp_path):
    model = lookup_model(tmp_path / "lookup.onnx", rows=10)
    bodies = [{"inputs": {"ids": [[i % 10]]}} for i in range(15)]
    bodies.insert(7, {"inputs": {"ids": [[100]]}})  # a valid int64 that the model cannot look up
    with run_service(str(model), tmp_path, MAX_BATCH_DELAY_MS="200") as service:
        service.wait_state("ready")
        responses = post_concurrently(service, bodies)
        stats = batching(service)["worker"]
        after = service.predict({"inputs": {"ids": [[3]]}})
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 7 + [422] + [200] * 8, [r.text for r in responses]
    assert "ids" in responses[7].json()["detail"] and "rejected" in responses[7].json()["detail"]
    for body, response in zip(bodies, responses):
        if response.status_code == 200:
            expected = reference_outputs(model, {"ids": np.array(body["inputs"]["ids"], np.int64)})[0]
            assert response.json()["outputs"]["vectors"] == expected.tolist()
    assert stats["largest_batch_requests"] > 1, stats
    assert after.status_code == 200 and after.json()["outputs"]["vectors"] == [[[6.0, 7.0]]]


def test_shared_dimensions_are_checked_per_request_before_rows_are_stacked(tmp_path):
    # ids [N, 3] and scale [N, 1] share "N". Of two malformed requests, one of 2 ids and 1 scale, one of 1 id and
    # 2 scales, the stacked batch would have 3 and 3 rows and run: each must be refused on its own.
    model = two_input_model(tmp_path / "two.onnx")
    good = [{"inputs": {"ids": [[i, i + 1, i + 2]], "scale": [[0.5 * i]]}} for i in range(14)]
    bad = [{"inputs": {"ids": [[1, 2, 3], [4, 5, 6]], "scale": [[1.0]]}}, {"inputs": {"ids": [[1, 2, 3]], "scale": [[1.0], [2.0]]}}]
    bodies = good[:7] + bad + good[7:]
    with run_service(str(model), tmp_path, MAX_BATCH_DELAY_MS="200") as service:
        service.wait_state("ready")
        assert batching(service)["enabled"] is True
        responses = post_concurrently(service, bodies)
        stats = batching(service)["worker"]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 7 + [422, 422] + [200] * 7, [r.text for r in responses]
    assert "sizes 2 and 1" in responses[7].json()["detail"] and "sizes 1 and 2" in responses[8].json()["detail"]
    for body, response in zip(good, responses[:7] + responses[9:]):
        feeds = {"ids": np.array(body["inputs"]["ids"], np.int64), "scale": np.array(body["inputs"]["scale"], np.float32)}
        assert response.json()["outputs"]["out"] == reference_outputs(model, feeds)[0].tolist()
    assert stats["largest_batch_requests"] > 1, stats


@pytest.mark.slow
def test_health_answers_while_64_clients_saturate_the_worker(tmp_path):
    model = busy_model(tmp_path / "busy.onnx")
    body = request_bytes("POST", "/predict", b'{"inputs": {"features": [[' + b", ".join([b"0.5"] * 64) + b"]]}}")
    with run_service(str(model), tmp_path) as service:
        service.wait_state("ready")
        load: dict = {}
        thread = threading.Thread(target=lambda: load.update(result=run_load(service.port, body, 64, 4.0, 1.0)))
        thread.start()
        time.sleep(1.5)  # past the load's warm-up: the worker is saturated
        timings = []
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                started = time.perf_counter()
                response = client.get(service.url + "/health")
                timings.append(time.perf_counter() - started)
                assert response.status_code == 200 and response.json()["model_loaded"] is True
                time.sleep(0.05)
        thread.join(30)
        stats = batching(service)["worker"]
    result = load["result"]
    print(f"/health under 64 clients: median {statistics.median(timings) * 1e3:.1f} ms, max {max(timings) * 1e3:.1f} ms; "
          f"{result.requests_per_second:.0f} req/s; largest batch {stats['largest_batch_rows']} rows")
    assert result.errors == 0 and len(result.latencies) > 100
    assert max(timings) < 1.0, timings  # a bound for a busy CI machine; the benchmark reports the real figure
    assert stats["largest_batch_requests"] > 1  # under saturation the batches form by themselves


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BATCHING", "sometimes", "'auto', 'on' or 'off'"),
        ("MAX_BATCH_ROWS", "0", "greater than or equal to 1"),
        ("MAX_BATCH_DELAY_MS", "-5", "greater than or equal to 0"),
        ("MAX_BATCH_DELAY_MS", "soon", "valid number"),
    ],
)
def test_batching_settings_are_validated(demo_model, variable, value, expected):
    with pytest.raises(SettingsError) as raised:
        load_settings({"MODEL_URI": str(demo_model), variable: value})
    message = str(raised.value)
    assert variable in message and expected in message and repr(value) in message, message


def test_batching_off_still_answers_concurrent_clients(tmp_path):
    model = linear_model(tmp_path / "linear.onnx")
    rng = np.random.default_rng(4)
    bodies = [{"inputs": {"features": rng.normal(size=(2, 4)).round(4).tolist()}} for _ in range(16)]
    with run_service(str(model), tmp_path, BATCHING="off") as service:
        service.wait_state("ready")
        health = batching(service)
        responses = post_concurrently(service, bodies)
    assert health["enabled"] is False and "BATCHING=off" in health["reason"]
    assert_each_answer_is_its_own(model, "linear", bodies, responses)


def test_a_slow_model_is_ready_before_its_batching_self_test_ends(demo_model, monkeypatch):
    """A model whose warm-up run is slow (a large one) answers at once, unbatched, while its self-test runs beside
    the requests; batching turns on when the self-test passes."""
    import service.app
    from tests.service.test_app import client_for

    release = threading.Event()
    real = service.app.batch_safety

    def held_self_test(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.app, "BACKGROUND_SELF_TEST_SECONDS", -1.0)  # every warm-up counts as slow
    monkeypatch.setattr(service.app, "batch_safety", held_self_test)
    client = client_for(demo_model)
    try:
        health = client.get("/health")
        assert health.status_code == 200, health.json()
        assert health.json()["batching"]["enabled"] is False
        assert "until the batching self-test" in health.json()["batching"]["reason"]
        answer = client.post("/predict", json={"inputs": {"features": [[5.1, 3.5, 1.4, 0.2]]}})
        assert answer.status_code == 200
        release.set()
        wait_for(lambda: client.get("/health").json()["batching"]["enabled"], 10, what="batching on after the self-test")
    finally:
        release.set()
        client.__exit__(None, None, None)
