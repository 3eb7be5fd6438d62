"""API keys (API_KEYS, service/auth.py): the app in-process for every route's answer, then real gunicorn for what
a deployed service shows: the access log and start-up errors never hold a key, tritonclient sends one through its
`headers`, and the metrics port stays open to the scraper."""

from __future__ import annotations

import subprocess

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.settings import SettingsError, load_settings
from tests.support.models import reference_outputs
from tests.support.ports import free_port
from tests.support.server import GUNICORN, ROOT, run_service, service_env
from tests.support.waiting import wait_loaded

KEY = "k1-Zq9vX2mB7tLr4sW8yN3pHc6dF"
NEXT = "k2-Vh5jT1nQ8xR2wE6uY9aK4gM0"  # a second key: the one clients move to while KEY is retired
ROW = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
V2_ROW = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


@pytest.fixture
def keyed(demo_model):
    app = create_app(load_settings({
        "MODEL_URI": str(demo_model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1", "API_KEYS": f"{KEY}, {NEXT}"}))  # fmt: skip
    with TestClient(app) as client:
        wait_loaded(app)
        yield client


GUARDED = [
    ("POST", "/predict", ROW, "detail"),
    ("GET", "/metadata", None, "detail"),
    ("GET", "/v2", None, "error"),
    ("GET", "/v2/models/demo", None, "error"),
    ("GET", "/v2/models/demo/ready", None, "error"),
    ("POST", "/v2/models/demo/infer", V2_ROW, "error"),
    ("POST", "/v2/models/demo/versions/1/infer", V2_ROW, "error"),
    ("GET", "/no-such-route", None, "detail"),  # a 401 first: no key, no map of what the service serves
]


@pytest.mark.parametrize("method, path, body, field", GUARDED)
def test_every_route_but_health_needs_a_key(keyed, method, path, body, field):
    refused = keyed.request(method, path, json=body)
    assert refused.status_code == 401, refused.text
    assert refused.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer KEY" in refused.json()[field] and "X-API-Key: KEY" in refused.json()[field]
    wrong = keyed.request(method, path, json=body, headers={"Authorization": "Bearer " + KEY[:-1] + "x"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert "not valid" in wrong.json()[field] and KEY[:-1] not in wrong.text
    expected = 404 if path == "/no-such-route" else 200
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {NEXT}"}, {"X-API-Key": KEY}):
        answered = keyed.request(method, path, json=body, headers=headers)
        assert answered.status_code == expected, (headers, answered.text)


def test_health_routes_and_the_docs_need_none(keyed):
    for path in ("/health", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_x_api_key_wins_over_authorization_as_on_cloud_run(keyed):
    # Cloud Run's IAM takes the identity token in Authorization and passes it on: the key rides in X-API-Key.
    identity_token = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3gifQ.c2lnbmF0dXJl"
    both = {"Authorization": f"Bearer {identity_token}", "X-API-Key": NEXT}
    assert keyed.post("/predict", json=ROW, headers=both).status_code == 200
    wrong_key = {"Authorization": f"Bearer {KEY}", "X-API-Key": "not-the-key-0123456789"}
    assert keyed.post("/predict", json=ROW, headers=wrong_key).status_code == 401
    assert keyed.post("/predict", json=ROW, headers={"Authorization": f"Basic {KEY}"}).status_code == 401


def test_openapi_declares_both_schemes_so_swagger_ui_can_send_a_key(keyed):
    document = keyed.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": "one of the service's API_KEYS"}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert document["security"] == [{"bearer": []}, {"apiKey": []}]
    predict = document["paths"]["/predict"]["post"]
    assert "security" not in predict and predict["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Detail"}  # fmt: skip
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["401"]
    assert infer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    for path in ("/health", "/v2/health/live", "/v2/health/ready"):
        assert document["paths"][path]["get"]["security"] == [] and "401" not in document["paths"][path]["get"]["responses"]


def test_without_keys_the_document_declares_no_scheme(demo_model):
    app = create_app(load_settings({"MODEL_URI": str(demo_model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1"}))
    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
    assert "securitySchemes" not in document["components"] and "security" not in document
    assert "401" not in document["paths"]["/predict"]["post"]["responses"]


def test_docs_false_puts_the_document_behind_the_key_too(demo_model):
    app = create_app(load_settings({
        "MODEL_URI": str(demo_model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1", "API_KEYS": KEY, "DOCS": "false"}))  # fmt: skip
    with TestClient(app) as client:
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/openapi.json", headers={"X-API-Key": KEY}).status_code == 200
        wait_loaded(app)  # /health answers without a key either way, but 200 only once the model is in
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("value", ["s3cr3tXY", f"{KEY},tinyQ7", f"{KEY[:10]} {KEY[10:]}"])
def test_a_weak_or_malformed_key_stops_start_up_without_showing_it(demo_model, value):
    with pytest.raises(SettingsError) as error:
        load_settings({"MODEL_URI": str(demo_model), "API_KEYS": value})
    message = str(error.value)
    assert "API_KEYS" in message and "16 printable characters" in message and "invoke fly.api-key" in message
    for part in value.replace(",", " ").split():
        assert part not in message


@pytest.mark.slow
def test_under_gunicorn_no_key_reaches_the_log_and_tritonclient_sends_one_in_headers(demo_model, tmp_path):
    metrics_port = free_port()
    with run_service(str(demo_model), tmp_path, API_KEYS=f"{KEY},{NEXT}", ACCESS_LOG="all", LOG_LEVEL="debug",
                     METRICS_PORT=str(metrics_port)) as service:  # fmt: skip
        service.wait_state("ready")
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        rows = np.array(ROW["inputs"], np.float32)
        tensor = triton.InferInput("features", [1, 4], "FP32")
        tensor.set_data_from_numpy(rows)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("demo", [tensor])
        assert refused.value.status() == "401" and "API key" in refused.value.message()
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": NEXT}):
            result = client.infer("demo", [tensor], headers=headers)
            np.testing.assert_allclose(result.as_numpy("logits"), reference_outputs(demo_model, {"features": rows})[0],
                                       rtol=1e-6)  # fmt: skip
        wrong = "guessed-key-" + KEY[::-1]
        for headers in ({"Authorization": f"Bearer {wrong}"}, {"X-API-Key": wrong}, {"X-API-Key": KEY}):
            service.predict(ROW, headers=headers)
        service.predict(b'{"inputs": [[1, 2]]}', headers={"X-API-Key": KEY})  # a 422 after the key passed
        # the scraper's port is not the public one and needs no key
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).status_code == 200
        log = service.raw_log()
    statuses = [line["httpRequest"]["status"] for line in service.log_lines() if "httpRequest" in line]
    assert statuses.count(401) == 3 and 422 in statuses, statuses  # tritonclient's refusal and the two wrong keys
    for secret in (KEY, NEXT, wrong):
        assert secret not in log


def test_an_invalid_api_keys_setting_at_start_is_reported_without_the_key(demo_model, tmp_path):
    port = free_port()
    secret = "a-secret-with space-in-it-123"
    result = subprocess.run(GUNICORN, cwd=ROOT, env=service_env(str(demo_model), port, API_KEYS=secret),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "API_KEYS" in output and "16 printable characters" in output
    assert secret not in output and "space-in-it" not in output
