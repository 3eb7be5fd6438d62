"""Keyless Fly -> Cloud Storage: the real google-auth and google-cloud-storage, in process and inside the real
service, against local stand-ins of the Fly machine API socket, Google's token exchange (STS) and service-account
impersonation; the real storage emulator serves the model behind a gate that accepts only the token that
impersonation issued. No key file exists anywhere in these tests."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import pytest
from google.auth import _helpers

from service.credentials import storage_client
from service.settings import Settings, SettingsError, load_settings
from tests.support.google_federation import BearerGate, FlyMachineApi, GoogleTokenServices, jwt_claims
from tests.support.server import run_service

PROVIDER = "projects/123456789012/locations/global/workloadIdentityPools/fly/providers/fly-my-onnx-app"
ACCOUNT = "onnx-serve-runtime@stub-project.iam.gserviceaccount.com"
BUCKET = "fly-models"
MODEL_URI = f"gs://{BUCKET}/demo.onnx"


class Federation:
    def __init__(self, fly: FlyMachineApi, google: GoogleTokenServices, gate: BearerGate):
        self.fly, self.google, self.gate = fly, google, gate

    @property
    def env(self) -> dict[str, str]:
        """What fly.toml and `invoke deploy --target fly` give the app, pointed at the stand-ins."""
        return {
            "GCP_WORKLOAD_IDENTITY_PROVIDER": PROVIDER, "GCP_SERVICE_ACCOUNT": ACCOUNT,
            "FLY_API_SOCKET": str(self.fly.socket_path), "GCP_STS_URL": self.google.sts_url,
            "GCP_IAM_CREDENTIALS_URL": self.google.url, "STORAGE_EMULATOR_HOST": self.gate.host,
            "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA": "true",
        }

    def settings(self) -> Settings:
        return load_settings({"MODEL_URI": MODEL_URI, **self.env})


@pytest.fixture
def federation(emulator, demo_model, monkeypatch):
    emulator.upload(BUCKET, "demo.onnx", demo_model)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fly-")))  # short: a socket path
        fly = stack.enter_context(FlyMachineApi(directory / "api").serve())
        google = stack.enter_context(GoogleTokenServices(PROVIDER, ACCOUNT).serve())
        gate = stack.enter_context(BearerGate(google, emulator.host).serve())
        federation = Federation(fly, google, gate)
        for name, value in federation.env.items():
            monkeypatch.setenv(name, value)
        yield federation


def test_the_storage_client_reads_the_model_with_the_token_exchanged_for_the_machines_fly_token(federation,
                                                                                               demo_model):
    client = storage_client(federation.settings())
    assert client.project == "stub-project"  # from the account: no Resource Manager lookup, no error
    data = client.bucket(BUCKET).blob("demo.onnx").download_as_bytes()
    assert data == demo_model.read_bytes()

    (audience,) = federation.fly.audiences  # the provider's full name, as Google expects it by default
    assert audience == f"//iam.googleapis.com/{PROVIDER}"
    (exchange,) = federation.google.exchanges
    assert exchange["subject_token"] == federation.fly.tokens[0]
    assert jwt_claims(exchange["subject_token"])["sub"] == "acme:my-onnx-app:148ed193b95089"
    (issued,) = federation.google.access_tokens
    assert federation.gate.seen and set(federation.gate.seen) == {f"Bearer {issued}"}


@pytest.mark.slow
def test_the_token_is_refreshed_before_it_expires_with_a_fresh_fly_token(federation):
    # google-auth treats a token as stale REFRESH_THRESHOLD before its expiry: both tokens live 3 s past that.
    lifetime = _helpers.REFRESH_THRESHOLD.total_seconds() + 3
    federation.google.access_token_lifetime = federation.google.federated_token_lifetime = lifetime
    blob = storage_client(federation.settings()).bucket(BUCKET).blob("demo.onnx")
    blob.reload()
    blob.reload()
    assert len(federation.google.access_tokens) == 1  # still fresh: no second exchange
    time.sleep(3.5)
    blob.reload()
    first, second = federation.google.access_tokens
    assert federation.gate.seen == [f"Bearer {first}"] * 2 + [f"Bearer {second}"]
    assert len(federation.fly.tokens) == len(federation.google.exchanges) == 2


def test_the_service_loads_the_model_with_no_key_file(federation, tmp_path):
    with run_service(MODEL_URI, tmp_path, MODEL_CACHE_DIR=str(tmp_path / "cache")) as service:
        health = service.wait_state("ready")
    assert health["model_loaded"] is True
    assert federation.google.access_tokens and all(
        federation.google.valid(seen) for seen in federation.gate.seen)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arrange, expected",
    [
        (lambda f: setattr(f.fly, "lifetime", -60), "the Fly OIDC token was refused as expired"),
        (lambda f: setattr(f.fly, "app", "another-app"), "rejected by the attribute condition"),
        (lambda f: setattr(f.google, "service_account", "other@stub-project.iam.gserviceaccount.com"),
         "impersonating GCP_SERVICE_ACCOUNT was refused"),
        (lambda f: setattr(f.fly, "refuse", 403), "the Fly machine API refused an OIDC token (403"),
    ],
    ids=["expired", "other-app", "not-bound", "socket-refuses"],
)
def test_a_refused_token_is_a_load_failure_on_health_that_names_the_cause_and_fix(federation, tmp_path, arrange,
                                                                                 expected):
    arrange(federation)
    with run_service(MODEL_URI, tmp_path, MODEL_LOAD_DEADLINE="10") as service:
        health = service.wait_state("failed", timeout=30)
    assert health["error"].startswith(f"no Google token to read {MODEL_URI}: ")
    for part in expected:
        assert part in health["error"]
    assert not any(federation.google.valid(seen) for seen in federation.gate.seen)  # storage never saw a token


def test_a_malformed_provider_stops_start_up_with_the_expected_form():
    with pytest.raises(SettingsError, match="GCP_WORKLOAD_IDENTITY_PROVIDER must be projects/NUMBER/locations/global"):
        load_settings({"MODEL_URI": MODEL_URI, "GCP_WORKLOAD_IDENTITY_PROVIDER": "fly-my-onnx-app",
                       "GCP_SERVICE_ACCOUNT": ACCOUNT})
