"""The Open Inference Protocol (KServe V2) driven by a real client of it, tritonclient[http], against real gunicorn:
JSON and binary tensor data, outputs compared with onnxruntime run in-process."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.models import reference_outputs, scalar_input_model, two_input_model
from tests.support.ports import free_port
from tests.support.server import run_service

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [0.0, -1.0, 2.5, 100.0]], np.float32)


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory):
    from tests.support.models import DEMO_MODEL

    with run_service(str(DEMO_MODEL), tmp_path_factory.mktemp("demo")) as service:
        service.wait_state("ready")
        yield service


@pytest.fixture(scope="module")
def client(demo_service):
    return triton.InferenceServerClient(f"127.0.0.1:{demo_service.port}")


def infer_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_health_and_metadata_as_the_client_reads_them(client, demo_service):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    server = client.get_server_metadata()
    assert server["name"] == "onnx-serve" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata("demo")
    assert metadata["platform"] == "onnx_onnxv1"
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", "FP32", [-1, 3]), ("probabilities", "FP32", [-1, 3])
    ]
    # The bodies the kserve client reads, not only the status.
    assert httpx.get(demo_service.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(demo_service.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(demo_service.url + "/v2/models/demo/ready").json() == {"name": "demo", "ready": True}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnxruntime_in_process(client, demo_model, binary):
    logits, probabilities = reference_outputs(demo_model, {"features": ROWS})
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
    result = client.infer("demo", [infer_input("features", ROWS, "FP32", binary)], outputs=outputs, request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "demo"
    assert all(("parameters" in o) == binary for o in response["outputs"])


def test_a_requested_subset_of_outputs_is_all_that_comes_back(client, demo_model):
    probabilities = reference_outputs(demo_model, {"features": ROWS})[1]
    result = client.infer(
        "demo", [infer_input("features", ROWS, "FP32", True)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)],
    )  # fmt: skip
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("logits") is None
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)


def test_default_request_is_binary_both_ways_and_sends_no_content_type(client, demo_model):
    result = client.infer("demo", [infer_input("features", ROWS, "FP32", True)])  # no outputs: binary_data_output
    assert {o["name"] for o in result.get_response()["outputs"]} == {"logits", "probabilities"}
    np.testing.assert_allclose(result.as_numpy("logits"), reference_outputs(demo_model, {"features": ROWS})[0], rtol=1e-6)


def test_json_request_without_content_type_and_versioned_path(demo_service, demo_model):
    body = {"inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", "data": ROWS.reshape(-1).tolist()}]}
    for path in ("/v2/models/demo/infer", "/v2/models/demo/versions/1/infer"):
        response = httpx.post(demo_service.url + path, content=json.dumps(body))  # no Content-Type at all
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        logits = next(o for o in answer["outputs"] if o["name"] == "logits")
        assert logits["shape"] == [3, 3] and logits["datatype"] == "FP32"
        expected = reference_outputs(demo_model, {"features": ROWS})[0]
        np.testing.assert_allclose(np.array(logits["data"]).reshape(3, 3), expected, rtol=1e-6)


@pytest.mark.slow
def test_integer_and_float_inputs_and_a_rank_0_input(tmp_path):
    two = two_input_model(tmp_path / "two.onnx")
    scalar = scalar_input_model(tmp_path / "scalar.onnx")
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    scale = np.array([[0.5], [2.0]], np.float32)
    with run_service(str(two), tmp_path) as service:
        service.wait_state("ready")
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        for binary in (True, False):
            result = client.infer("two", [infer_input("ids", ids, "INT64", binary), infer_input("scale", scale, "FP32", binary)])
            np.testing.assert_allclose(result.as_numpy("out"), reference_outputs(two, {"ids": ids, "scale": scale})[0])
            # scale of 1 row beside ids of 2: they share "N", so 400 naming both, not onnxruntime's broadcast
            with pytest.raises(InferenceServerException) as refused:
                client.infer("two", [infer_input("ids", ids, "INT64", binary), infer_input("scale", scale[:1], "FP32", binary)])
            assert refused.value.status() == "400" and "'ids' and 'scale' share dimension 'N'" in refused.value.message()
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    factor = np.array(3.0, np.float32)
    with run_service(str(scalar), tmp_path, MODEL_NAME="scaler") as service:
        service.wait_state("ready")
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        assert client.get_model_metadata("scaler")["inputs"][1] == {"name": "scale", "datatype": "FP32", "shape": []}
        for binary in (True, False):
            result = client.infer("scaler", [infer_input("x", x, "FP32", binary), infer_input("scale", factor, "FP32", binary)])
            np.testing.assert_allclose(result.as_numpy("y"), x * 3.0)


def test_protocol_errors_are_4xx_with_an_error_body(client, demo_service):
    def post(path: str, body, headers=None):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(demo_service.url + path, content=content, headers=headers or {})

    good = {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    cases = [
        ("/v2/models/nope/infer", {"inputs": [good]}, None, 404, "unknown model 'nope'"),
        ("/v2/models/demo/versions/7/infer", {"inputs": [good]}, None, 404, "unknown version '7'"),
        ("/v2/models/demo/infer", {"inputs": [{**good, "shape": [1, 3], "data": [1, 2, 3]}]}, None, 400, "dimension 1 must be 4"),
        ("/v2/models/demo/infer", {"inputs": [{**good, "datatype": "INT64"}]}, None, 400, "the model expects FP32"),
        ("/v2/models/demo/infer", {"inputs": [{**good, "shape": [2, 4]}]}, None, 400, "needs 8"),
        ("/v2/models/demo/infer", {"inputs": [{**good, "data": ["a", "b", "c", "d"]}]}, None, 400, "features"),
        ("/v2/models/demo/infer", {"inputs": []}, None, 400, "missing input 'features'"),
        ("/v2/models/demo/infer", {"inputs": [good], "outputs": [{"name": "nope"}]}, None, 400, "unknown output 'nope'"),
        ("/v2/models/demo/infer", b"{not json", None, 400, "not valid JSON"),
        # Binary framing that does not add up: declared sizes past the body, a header longer than the body.
        ("/v2/models/demo/infer", json.dumps({"inputs": [{**good, "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 8,
         "header", 400, "only 8 follow"),
        ("/v2/models/demo/infer", b"{}", {"Inference-Header-Content-Length": "99"}, 400, "body has 2 bytes"),
        ("/v2/models/demo/infer", b"{}", {"Inference-Header-Content-Length": "x"}, 400, "byte count"),
    ]
    for path, body, headers, status, text in cases:
        if headers == "header":
            header = body[: body.index(b"}]}") + 3]
            headers = {"Inference-Header-Content-Length": str(len(header))}
        response = post(path, body, headers)
        assert response.status_code == status, (path, body, response.text)
        assert text in response.json()["error"], (text, response.json())
    with pytest.raises(InferenceServerException) as raised:
        client.infer("demo", [infer_input("features", np.zeros((1, 3), np.float32), "FP32", True)])
    assert raised.value.status() == "400" and "dimension 1 must be 4" in raised.value.message()


@pytest.mark.slow
def test_not_ready_is_503_with_an_error_and_a_gcs_model_is_versioned_by_generation(emulator, demo_model, tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}"
    with run_service("gs://late/model.onnx", tmp_path, STORAGE_EMULATOR_HOST=unreachable) as service:
        service.wait_answering()
        ready = httpx.get(service.url + "/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False and "loading" in ready.json()["error"]
        infer = httpx.post(service.url + "/v2/models/model/infer", json={"inputs": []})
        assert infer.status_code == 503 and "still loading" in infer.json()["error"]
        assert httpx.get(service.url + "/v2/health/live").json() == {"live": True}
    generation = emulator.upload("v2-models", "iris/classifier.onnx", demo_model)
    with run_service("gs://v2-models/iris/classifier.onnx", tmp_path, **emulator.env) as service:
        service.wait_state("ready")
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        assert client.get_model_metadata("classifier")["versions"] == [str(generation)]
        result = client.infer("classifier", [infer_input("features", ROWS, "FP32", True)], model_version=str(generation))
        assert result.get_response()["model_version"] == str(generation)
        np.testing.assert_allclose(result.as_numpy("logits"), reference_outputs(demo_model, {"features": ROWS})[0], rtol=1e-6)


@pytest.mark.slow
def test_string_tensors_travel_as_bytes_and_zipmap_outputs_as_json_documents(tmp_path):
    from tests.support.zoo import string_pipeline

    model = string_pipeline(tmp_path)
    cities = np.array([["oslo"], ["lima"], ["paris"]], dtype=object)
    label, probabilities = reference_outputs(model, {"city": cities})
    with run_service(str(model), tmp_path, MODEL_NAME="cities") as service:
        service.wait_state("ready")
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        metadata = client.get_model_metadata("cities")
        assert metadata["inputs"] == [{"name": "city", "datatype": "BYTES", "shape": [-1, 1]}]
        for binary in (True, False):
            outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("output_label", "output_probability")]
            result = client.infer("cities", [infer_input("city", cities, "BYTES", binary)], outputs=outputs)
            got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("output_label")]
            assert got == list(label)
            documents = [json.loads(v) for v in result.as_numpy("output_probability")]
            assert [{k: pytest.approx(p, rel=1e-6) for k, p in row.items()} for row in documents] == [
                {k: pytest.approx(p, rel=1e-6) for k, p in row.items()} for row in probabilities
            ]
        numbers = httpx.post(service.url + "/v2/models/cities/infer",
                             json={"inputs": [{"name": "city", "shape": [1, 1], "datatype": "BYTES", "data": [7]}]})
        assert numbers.status_code == 400 and "city" in numbers.json()["error"]
