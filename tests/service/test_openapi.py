"""/openapi.json describes the model being served, /docs shows it, and a schema fuzzer finds the service true to it.

The fuzzer (schemathesis) runs against the service as users run it (gunicorn, tests/support/server.py) with real
models: the demo model (one float32 input, the bare-list form), a two-input model with an int64 input, and a model
with a bool, int8, uint64, float16 and rank-0 float32 input.
"""

from __future__ import annotations

import hypothesis
import httpx
import numpy as np
import pytest
import schemathesis
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test
from fastapi.testclient import TestClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import load_settings
from tests.support.models import DEMO_MODEL, dtypes_model, two_input_model
from tests.support.server import run_service
from tests.support.waiting import wait_loaded

INT64 = {"type": "integer", "format": "int64", "minimum": -(2**63), "maximum": 2**63 - 1}
# Numbers up to here round to a finite float32; from here on they would be inf, which the service refuses.
FLOAT32_BOUND = 3.4028235677973366e38


def serving(make_model):
    """A module-scoped fixture: the service (gunicorn) on the model `make_model(folder)` writes, once ready."""

    @pytest.fixture(scope="module")
    def service(tmp_path_factory):
        folder = tmp_path_factory.mktemp("service")
        with run_service(str(make_model(folder)), folder) as running:
            running.wait_state("ready")
            yield running

    return service


demo_service = serving(lambda folder: DEMO_MODEL)
two_input_service = serving(lambda folder: two_input_model(folder / "two.onnx"))
dtypes_service = serving(lambda folder: dtypes_model(folder / "dtypes.onnx"))


def schema_of(service) -> dict:
    response = httpx.get(service.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def predict_body(document: dict) -> dict:
    return document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_predict_names_the_demo_models_input_as_rows_of_4_float32_numbers(demo_service):
    inputs = predict_body(schema_of(demo_service))["properties"]["inputs"]
    by_name, bare = inputs["anyOf"]
    assert by_name["required"] == ["features"] and by_name["additionalProperties"] is False
    features = by_name["properties"]["features"]
    assert bare == features  # a one-input model takes its tensor bare too
    assert features["type"] == "array" and features["minItems"] == 1 and "maxItems" not in features  # N rows
    row = features["items"]
    assert (row["type"], row["minItems"], row["maxItems"]) == ("array", 4, 4)
    values = row["items"]
    assert (values["type"], values["format"]) == ("number", "float")
    assert (values["exclusiveMinimum"], values["exclusiveMaximum"]) == (-FLOAT32_BOUND, FLOAT32_BOUND)


def test_the_float32_bound_in_the_schema_is_where_the_service_starts_refusing(demo_service):
    values = predict_body(schema_of(demo_service))["properties"]["inputs"]["anyOf"][1]["items"]["items"]
    bound = values["exclusiveMaximum"]
    below = float(np.nextafter(bound, 0))
    assert demo_service.predict({"inputs": [[below, 0, 0, 0]]}).status_code == 200
    refused = demo_service.predict({"inputs": [[bound, 0, 0, 0]]})
    assert refused.status_code == 422 and "'features'" in refused.json()["detail"]
    assert demo_service.predict({"inputs": [[1e39, 0, 0, 0]]}).status_code == 422


def test_two_input_model_ids_are_int64_and_both_inputs_are_required(two_input_service):
    document = schema_of(two_input_service)
    inputs = predict_body(document)["properties"]["inputs"]
    assert inputs["required"] == ["ids", "scale"]
    assert inputs["properties"]["ids"]["items"]["items"] == INT64
    assert inputs["properties"]["scale"]["items"]["maxItems"] == 1
    answer = document["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    out = answer["properties"]["outputs"]["properties"]["out"]
    assert out["items"]["maxItems"] == 3 and out["items"]["items"]["type"] == ["number", "null"]


def test_each_dtype_has_its_json_type_and_rank_0_is_a_bare_value(dtypes_service):
    inputs = predict_body(schema_of(dtypes_service))["properties"]["inputs"]["properties"]
    assert inputs["flag"]["items"] == {"type": "boolean"}
    assert (inputs["big"]["minItems"], inputs["big"]["maxItems"]) == (2, 2)
    assert inputs["big"]["items"]["maximum"] == 2**64 - 1 and inputs["big"]["items"]["minimum"] == 0
    assert inputs["half"]["items"]["exclusiveMaximum"] == 65520.0  # 65519 rounds to 65504, 65520 to inf
    assert inputs["scalar"]["type"] == "number"


VALID = {"flag": [True], "small": [[0, 0]], "big": [0, 0], "half": [0.5], "scalar": 0.0}


@pytest.mark.parametrize(
    "name, at_bound, beyond",
    [
        ("small", [[-128, 127]], [[127, 128]]),
        ("small", [[-128, 127]], [[-129, 0]]),
        ("big", [0, 2**64 - 1], [0, 2**64]),
        ("big", [0, 2**64 - 1], [-1, 0]),
        ("half", [-65519], [65520]),
        ("scalar", 3.4028235e38, FLOAT32_BOUND),
    ],
)
def test_values_the_schema_allows_are_served_and_those_beyond_its_range_refused(dtypes_service, name, at_bound, beyond):
    served = dtypes_service.predict({"inputs": {**VALID, name: at_bound}})
    assert served.status_code == 200
    if name in ("small", "big"):  # integers come back exactly as sent (the model is Identity)
        assert served.json()["outputs"][f"{name}_out"] == at_bound
    refused = dtypes_service.predict({"inputs": {**VALID, name: beyond}})
    assert refused.status_code == 422 and repr(name) in refused.json()["detail"]


def test_v2_infer_describes_each_input_with_its_datatype_and_shape(two_input_service):
    operation = schema_of(two_input_service)["paths"]["/v2/models/{name}/infer"]["post"]
    assert operation["parameters"][0]["schema"]["enum"] == ["two"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    ids, scale = body["properties"]["inputs"]["prefixItems"]
    assert ids["properties"]["datatype"] == {"enum": ["INT64"]}
    assert ids["properties"]["data"]["items"] == INT64
    assert ids["properties"]["shape"]["prefixItems"] == [{"type": "integer", "minimum": 0}, {"const": 3}]
    assert scale["properties"]["datatype"] == {"enum": ["FP32"]}
    assert set(operation["responses"]) == {"200", "400", "404", "413", "503"}
    assert "binary tensor data extension" in operation["description"]
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}


def test_error_answers_are_documented_with_their_bodies(demo_service):
    document = schema_of(demo_service)
    responses = document["paths"]["/predict"]["post"]["responses"]
    assert set(responses) == {"200", "400", "413", "422", "503"}
    assert responses["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Detail"}
    assert "Retry-After" in responses["503"]["headers"]
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]


def test_schema_is_generic_until_the_model_loads_then_typed(demo_model):
    app = create_app(load_settings({"MODEL_URI": str(demo_model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1"}))
    client = TestClient(app)  # no lifespan yet: the model is not loading
    before = predict_body(client.get("/openapi.json").json())["properties"]["inputs"]
    assert "features" not in str(before)
    with client:
        wait_loaded(app)
        after = predict_body(client.get("/openapi.json").json())["properties"]["inputs"]
    assert after["anyOf"][0]["required"] == ["features"]


def test_docs_page_is_served_and_can_be_turned_off(demo_model):
    for setting, status in [("true", 200), ("false", 404)]:
        app = create_app(load_settings({"MODEL_URI": str(demo_model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1", "DOCS": setting}))
        client = TestClient(app)
        page = client.get("/docs")
        assert page.status_code == status
        if status == 200:
            assert "swagger-ui" in page.text and "/openapi.json" in page.text
        assert client.get("/openapi.json").status_code == 200  # kept for client generation


# --- the schema fuzzer ------------------------------------------------------------------------------------------

# Every built-in check of schemathesis but one: positive_data_acceptance expects a 2xx for any request the schema
# allows, and JSON Schema cannot say what the service rightly refuses with a 4xx: inputs that share a dimension
# ("N") of different sizes, a V2 `shape` whose product is not the number of `data` values, an
# Inference-Header-Content-Length that is not the JSON part's length.
UNCHECKED = [positive_data_acceptance]
EXAMPLES, FUZZING = HypothesisTestMode.EXAMPLES, HypothesisTestMode.FUZZING
FUZZ = hypothesis.settings(
    max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck)
)


def fuzz(service) -> tuple[list[str], list[str]]:
    """Every documented operation, fuzzed: (operations, failures), each failure naming its operation.

    Each inference operation gets the three phases of `schemathesis run`: the schema's examples, coverage (values
    at and just beyond each bound, each type mutated) and fuzzing, with valid and invalid data; the others get
    examples and fuzzing. The test is built as schemathesis's pytest plugin builds it, whose `from_fixture` loader
    fails under pytest 9 (it reads `request.node._nodeid`).
    """
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    operations, failures = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations.append(operation.label)
        # Coverage where the model's tensors are typed; elsewhere it adds hundreds of odd paths and methods.
        modes = list(HypothesisTestMode) if operation.method.lower() == "post" else [EXAMPLES, FUZZING]
        config = HypothesisTestConfig(project=schema.config, modes=modes, settings=FUZZ)

        def call(case):
            case.call_and_validate(excluded_checks=UNCHECKED, timeout=30)

        try:
            create_test(operation=operation, test_func=call, config=config)()
        except (Exception, FailureGroup) as exc:  # per operation: what broke, hypothesis's smallest example
            failures.append(f"{operation.label}: {exc}")
    return operations, failures


@pytest.mark.slow
@pytest.mark.parametrize("service", ["demo_service", "two_input_service", "dtypes_service"])
def test_fuzzed_requests_get_documented_answers(service, request):
    operations, failures = fuzz(request.getfixturevalue(service))
    assert {"POST /predict", "POST /v2/models/{name}/infer", "GET /health"} <= set(operations)
    assert len(operations) == 12
    assert not failures, "\n\n".join(failures)
