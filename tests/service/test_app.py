"""The app in-process (its lifespan run by TestClient) with real onnxruntime sessions on real models."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import load_settings
from tests.support.models import reference_outputs, two_input_model
from tests.support.waiting import wait_for, wait_loaded


def client_for(model_path, **env):
    settings = load_settings({"MODEL_URI": str(model_path), "EXIT_ON_LOAD_FAILURE_AFTER": "-1", **env})
    app = create_app(settings)
    client = TestClient(app)
    client.__enter__()
    wait_loaded(app)
    return client


@pytest.fixture
def demo(demo_model):
    client = client_for(demo_model)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture
def two_inputs(tmp_path):
    client = client_for(two_input_model(tmp_path / "two.onnx"))
    yield client
    client.__exit__(None, None, None)


def test_metadata_lists_inputs_and_outputs(demo):
    body = demo.get("/metadata").json()
    assert body["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["N", 4]}]
    assert [o["name"] for o in body["outputs"]] == ["logits", "probabilities"]


def test_prediction_equals_onnxruntime_in_process(demo, demo_model):
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    response = demo.post("/predict", json={"inputs": {"features": rows}})
    assert response.status_code == 200
    logits, probabilities = reference_outputs(demo_model, {"features": np.array(rows, np.float32)})
    outputs = response.json()["outputs"]
    np.testing.assert_allclose(outputs["logits"], logits, rtol=1e-6)
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=1e-6)


def test_bare_list_is_accepted_for_a_one_input_model(demo):
    named = demo.post("/predict", json={"inputs": {"features": [[1, 2, 3, 4]]}}).json()
    bare = demo.post("/predict", json={"inputs": [[1, 2, 3, 4]]}).json()
    assert named == bare


def test_integer_and_float_inputs_of_a_two_input_model(two_inputs, tmp_path):
    response = two_inputs.post("/predict", json={"inputs": {"ids": [[1, 2, 3]], "scale": [[0.5]]}})
    assert response.status_code == 200
    assert response.json()["outputs"]["out"] == [[0.5, 1.0, 1.5]]


BAD_DEMO_INPUTS = [
    # (body, status, fragments the message must contain)
    (b'{"inputs": [[1, 2, 3, 4]', 400, ["not valid JSON", '"inputs"']),
    (b"[1, 2]", 422, ['"inputs" key']),
    (b'{"instances": [[1, 2, 3, 4]]}', 422, ['"inputs" key']),
    (b'{"inputs": {"feature": [[1, 2, 3, 4]]}}', 422, ["unknown input 'feature'", "['features']"]),
    (b'{"inputs": {}}', 422, ["missing input 'features'"]),
    (b'{"inputs": [1, 2, 3, 4]}', 422, ["'features'", "rank 1", "[N, 4]", "wrap a single example"]),
    (b'{"inputs": [[1, 2, 3]]}', 422, ["'features'", "shape [1, 3]", "[N, 4]", "dimension 1 must be 4"]),
    (b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', 422, ["'features'", "uneven lengths", "[N, 4]"]),
    (b'{"inputs": [["a", "b", "c", "d"]]}', 422, ["'features'", "strings", "float32"]),
    (b'{"inputs": [[1, null, 3, 4]]}', 422, ["'features'", "null"]),
    (b'{"inputs": {"features": "1,2,3,4"}}', 422, ["'features'", "strings"]),
    (b'{"inputs": 5}', 422, ['"inputs" must be an object']),
]


@pytest.mark.parametrize("body, status, fragments", BAD_DEMO_INPUTS)
def test_bad_input_gets_a_4xx_naming_the_input_and_the_expectation(demo, body, status, fragments):
    response = demo.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in detail


@pytest.mark.parametrize(
    "inputs, fragments",
    [
        ({"ids": [[1.5, 2, 3]], "scale": [[1.0]]}, ["'ids'", "with a fraction (such as 1.5)", "int64"]),
        ({"ids": [[1, 2, 3]], "scale": [[True]]}, ["'scale'", "booleans"]),
        ({"ids": [[1, 2, 3]], "scale": [[1.0]], "extra": [1]}, ["unknown input 'extra'"]),
        ([[1, 2, 3]], ["bare list", "['ids', 'scale']"]),
        # onnxruntime cannot broadcast 3 rows of scale over 2 of ids: its error, said in terms of the inputs
        ({"ids": [[1, 2, 3], [4, 5, 6]], "scale": [[1.0], [2.0], [3.0]]}, ["'ids' and 'scale' share dimension 'N'", "2 and 3"]),
        ({"ids": [[2**70, 2, 3]], "scale": [[1.0]]}, ["'ids'", "e+21", "outside the int64 range"]),
        ({"ids": [[-(2**64), 2, 3]], "scale": [[1.0]]}, ["'ids'", "outside the int64 range"]),
        ({"ids": [[1, 2, 3]], "scale": [[1e39]]}, ["'scale'", "1e+39", "outside the float32 range"]),
        ({"ids": [[1, 2, 3]], "scale": [[1, True]]}, ["'scale'", "booleans"]),
    ],
)
def test_dtype_and_structure_errors_on_a_two_input_model(two_inputs, inputs, fragments):
    response = two_inputs.post("/predict", json={"inputs": inputs})
    assert 400 <= response.status_code < 500, response.text
    for fragment in fragments:
        assert fragment in response.json()["detail"]


def test_inputs_that_disagree_on_a_dimension_the_model_names_alike_are_refused(two_inputs, tmp_path):
    # ids [N, 3] and scale [N, 1] share "N": onnxruntime would broadcast 1 row of scale over 2 rows of ids and
    # answer 200 with numbers computed from a malformed request.
    ids, scale = [[1, 2, 3], [4, 5, 6]], [[0.5]]
    response = two_inputs.post("/predict", json={"inputs": {"ids": ids, "scale": scale}})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "inputs 'ids' and 'scale' share dimension 'N' but have sizes 2 and 1" in detail
    assert "onnxruntime" not in detail  # refused before the model ran, not explained after
    # V2 speaks 400 with {"error"}, the same words
    v2 = two_inputs.post("/v2/models/two/infer", json={"inputs": [
        {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3, 4, 5, 6]},
        {"name": "scale", "shape": [1, 1], "datatype": "FP32", "data": [0.5]},
    ]})  # fmt: skip
    assert v2.status_code == 400 and "'ids' and 'scale' share dimension 'N'" in v2.json()["error"], v2.text


def test_check_shared_dims_false_lets_onnxruntime_broadcast_for_one_model(tmp_path):
    model = two_input_model(tmp_path / "two.onnx")
    client = client_for(model, CHECK_SHARED_DIMS="false", WARMUP_INPUT='{"inputs": {"ids": [[1, 2, 3], [4, 5, 6]], "scale": [[1.0]]}}')
    try:
        ids, scale = [[1, 2, 3], [4, 5, 6]], [[0.5]]
        response = client.post("/predict", json={"inputs": {"ids": ids, "scale": scale}})
        assert response.status_code == 200, response.text
        (expected,) = reference_outputs(model, {"ids": np.array(ids, np.int64), "scale": np.array(scale, np.float32)})
        assert response.json()["outputs"]["out"] == expected.tolist()
        # what onnxruntime cannot broadcast is still a 422 naming the inputs
        response = client.post("/predict", json={"inputs": {"ids": ids, "scale": [[1.0], [2.0], [3.0]]}})
        assert response.status_code == 422 and "'ids' and 'scale' share dimension 'N'" in response.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def test_a_warmup_input_that_breaks_the_rule_fails_the_load_saying_so(tmp_path):
    model = two_input_model(tmp_path / "two.onnx")
    client = client_for(model, WARMUP_INPUT='{"inputs": {"ids": [[1, 2, 3], [4, 5, 6]], "scale": [[1.0]]}}')
    try:
        health = client.get("/health").json()
        assert health["status"] == "failed" and "share dimension 'N'" in health["error"], health
    finally:
        client.__exit__(None, None, None)


def test_whole_numbers_written_with_a_fraction_part_are_integers(two_inputs):
    response = two_inputs.post("/predict", json={"inputs": {"ids": [[1.0, 2.0, 3e0]], "scale": [[2]]}})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"]["out"] == [[2.0, 4.0, 6.0]]


def test_body_over_the_limit_is_refused_with_413(demo_model):
    client = client_for(demo_model, MAX_BODY_BYTES="2048")
    try:
        big = b'{"inputs": [' + b",".join([b"[1.0, 2.0, 3.0, 4.0]"] * 200) + b"]}"
        response = client.post("/predict", content=big)
        assert response.status_code == 413
        assert "MAX_BODY_BYTES" in response.json()["detail"]
        # chunked: no Content-Length to trust, the limit still holds
        response = client.post("/predict", content=iter([big[:1500], big[1500:]]))
        assert response.status_code == 413
        assert client.post("/predict", json={"inputs": [[1, 2, 3, 4]]}).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_corrupt_local_model_fails_with_reason_and_refuses_predictions(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    client = client_for(bad)
    try:
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert (body["status"], body["model_loaded"]) == ("failed", False)
        assert "not a model onnxruntime can open" in body["error"]
        refused = client.post("/predict", json={"inputs": [[1, 2, 3, 4]]})
        assert refused.status_code == 503 and "failed to load" in refused.json()["detail"]
        assert client.get("/metadata").status_code == 503
    finally:
        client.__exit__(None, None, None)


def access_lines(client, count: int) -> list[dict]:
    """The last `count` access-log lines: written at the end of the event loop's turn, which runs in the test
    client's own thread, so wait for them."""

    def written():
        lines = [json.loads(line) for line in client.app.logged.lines.stream.getvalue().splitlines()]
        return len(lines) >= count and lines[-count:]

    return wait_for(written, 5, interval=0.01, what=f"{count} access-log lines")


@pytest.fixture
def logged(demo_model):
    import io

    import logging

    from service import logs

    client = client_for(demo_model, GOOGLE_CLOUD_PROJECT="proj", ACCESS_LOG="all")
    client.app.logged.lines.stream = io.BytesIO()
    logs.JsonFormatter.project = "proj"  # what gunicorn.conf.py sets in each worker
    access = logging.getLogger("service.access")
    level = access.level
    access.setLevel(logging.INFO)
    yield client
    access.setLevel(level)
    logs.JsonFormatter.project = ""
    client.__exit__(None, None, None)


def test_trace_comes_from_traceparent_first_then_x_cloud_trace_context(logged):
    trace, other = "4bf92f3577b34da6a3ce929d0e0e4736", "105445aa7843bc8bf206b12000100000"
    logged.get("/health", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "X-Cloud-Trace-Context": f"{other}/1;o=1"})
    logged.get("/health", headers={"X-Cloud-Trace-Context": f"{other}/255;o=0"})
    first, second = access_lines(logged, 2)
    assert first["logging.googleapis.com/trace"] == f"projects/proj/traces/{trace}"
    assert first["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert first["logging.googleapis.com/trace_sampled"] is True
    assert second["logging.googleapis.com/trace"] == f"projects/proj/traces/{other}"
    assert second["logging.googleapis.com/spanId"] == "00000000000000ff"  # decimal span id, as Cloud Logging's hex
    assert second["logging.googleapis.com/trace_sampled"] is False


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": b"00-\xff\xfe-garbage"},
        {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},  # all-zero trace id
        {"traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},  # forbidden version
        {"X-Cloud-Trace-Context": b"\xc3\x28/1;o=1"},  # not UTF-8
        {"X-Cloud-Trace-Context": "not-a-trace/abc;o=9"},
        {"traceparent": "", "X-Cloud-Trace-Context": ""},
    ],
)
def test_a_malformed_trace_header_is_ignored_on_every_route(logged, headers):
    assert logged.get("/health", headers=headers).status_code == 200
    assert logged.get("/metadata", headers=headers).status_code == 200
    response = logged.post("/predict", json={"inputs": [[1, 2, 3, 4]]}, headers=headers)
    assert response.status_code == 200
    lines = access_lines(logged, 3)
    assert [line["httpRequest"]["status"] for line in lines] == [200, 200, 200]
    assert not any("logging.googleapis.com/trace" in line for line in lines)


@pytest.mark.parametrize(("mode", "logged_statuses"), [("all", [200, 422]), ("errors", [422]), ("off", [])])
def test_access_log_modes(demo_model, mode, logged_statuses):
    import io
    import logging
    import time

    client = client_for(demo_model, ACCESS_LOG=mode)
    client.app.logged.lines.stream = io.BytesIO()
    access = logging.getLogger("service.access")
    level = access.level
    access.setLevel(logging.INFO)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}  # set, then reset, with or without a line
    try:
        assert client.post("/predict", json={"inputs": [[1, 2, 3, 4]]}, headers=headers).status_code == 200
        assert client.post("/predict", json={"inputs": [[1, 2, 3]]}, headers=headers).status_code == 422
        if logged_statuses:
            access_lines(client, len(logged_statuses))  # the lines of a loop turn are written at its end
        else:
            time.sleep(0.2)  # room for a line that must not come
        lines = [json.loads(line) for line in client.app.logged.lines.stream.getvalue().splitlines()]
    finally:
        access.setLevel(level)
        client.__exit__(None, None, None)
    assert [line["httpRequest"]["status"] for line in lines] == logged_statuses
    assert all(line["logging.googleapis.com/trace"] == trace for line in lines)


def test_uvicorn_serves_the_app_as_asgi_3(demo_model):
    """`InferenceApp.__call__` returns its route's coroutine rather than being one: uvicorn must still take it for
    an ASGI 3 app (it would wrap anything else in its ASGI 2 adapter, which calls it with the scope alone)."""
    import uvicorn

    client = client_for(demo_model)
    try:
        config = uvicorn.Config(client.app)
        config.load()
        assert config.interface == "asgi3"
    finally:
        client.__exit__(None, None, None)


def test_access_log_accepts_true_and_false(demo_model):
    assert load_settings({"MODEL_URI": str(demo_model), "ACCESS_LOG": "true"}).access_log == "all"
    assert load_settings({"MODEL_URI": str(demo_model), "ACCESS_LOG": "False"}).access_log == "off"
    assert load_settings({"MODEL_URI": str(demo_model)}).access_log == "errors"
