"""`invoke deploy --target fly`, `invoke rollback --target fly` and `invoke fly.credentials` against a stand-in
flyctl that follows Fly's documented CLI contract (the real flyctl cannot be installed here); the smoke test
reaches real local services through fly.url."""

from __future__ import annotations

import base64
import json
import string
import subprocess

import pytest

from tests.support.models import ROOT
from tests.toolkit.conftest import SERVICE_KEY
from tests.toolkit.deploy_helpers import invoke

APP = "onnx-serve-test"
OLD_IMAGE = f"registry.fly.io/{APP}:deployment-old"
PROVIDER = "projects/123456789012/locations/global/workloadIdentityPools/fly/providers/fly-onnx-serve-test"
RUNTIME = "onnx-serve-runtime@stub-project.iam.gserviceaccount.com"
# keyless, as `invoke gcp.setup --fly` leaves it
CONFIG = dict(fly_app=APP, model_uri="gs://my-models/demo.onnx", smoke_timeout="20", gcp_project="stub-project",
              fly_workload_identity_provider=PROVIDER)
KEYLESS_ENV = ["--env", f"GCP_WORKLOAD_IDENTITY_PROVIDER={PROVIDER}", "--env", f"GCP_SERVICE_ACCOUNT={RUNTIME}",
               "--env", "GOOGLE_CLOUD_PROJECT=stub-project"]


def deploys(fake) -> list[list[str]]:
    return [argv for argv in fake.argvs() if argv[:1] == ["deploy"]]


@pytest.mark.slow
def test_deploy_uses_the_remote_builder_then_smoke_tests_the_app(fake_flyctl, healthy):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    result = invoke("deploy", "--target", "fly", "--tag", "v2", **CONFIG, fly_url=healthy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke test passed" in result.stdout
    (deploy,) = deploys(fake_flyctl)
    build_args = deploy[deploy.index("--build-arg"):]  # what the image's /health shows as "build"
    deploy = deploy[:deploy.index("--build-arg")]
    assert deploy == ["deploy", "--app", APP, "--config", "fly.toml", "--wait-timeout", "10m", "--remote-only",
                      "--image-label", "v2", "--env", "MODEL_URI=gs://my-models/demo.onnx", *KEYLESS_ENV]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert build_args[0::2] == ["--build-arg"] * 3 and build_args[1].startswith(f"BUILD_REVISION={head}")
    assert build_args[3] == "BUILD_VERSION=v2" and build_args[5].startswith("BUILD_CREATED=")
    assert not any("GOOGLE_APPLICATION_CREDENTIALS" in arg or "--file-secret" == arg for arg in deploy)  # no key
    commands = [argv[:2] for argv in fake_flyctl.argvs()]
    assert commands.index(["auth", "whoami"]) < commands.index(["status", "--json"]) < commands.index(deploy[:2])


@pytest.mark.slow
def test_failed_smoke_test_redeploys_the_previous_image(fake_flyctl, broken):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    result = invoke("deploy", "--target", "fly", "--tag", "v3", **CONFIG, fly_url=broken)
    assert result.returncode == 1
    assert "smoke test failed: the model failed to load" in result.stderr
    first, back = deploys(fake_flyctl)
    assert "--remote-only" in first
    image = back[back.index("--image") + 1]
    assert image.startswith(f"registry.fly.io/{APP}") and ("deployment-old" in image or "@sha256:" in image)
    assert back[back.index("--strategy") + 1] == "immediate"
    assert "rolled back to" in result.stderr


@pytest.mark.slow
def test_failed_smoke_test_rollback_keeps_the_env_the_machines_had(fake_flyctl, broken):
    before = {"PORT": "8080", "WEB_CONCURRENCY": "1", "MODEL_URI": "gs://my-models/demo.onnx#1",
              "MODEL_SHA256": "cd" * 32, "LOG_LEVEL": "debug", "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/gcp.json"}
    fake_flyctl.add_app(APP, image=OLD_IMAGE, env=before)
    fake_flyctl.run("secrets", "set", "API_KEYS=-", "--app", APP, input="key-one", check=True)
    result = invoke("deploy", "--target", "fly", "--tag", "v3", **CONFIG, fly_url=broken)
    assert result.returncode == 1
    first, back = deploys(fake_flyctl)
    assert [m["config"]["env"] for m in fake_flyctl.app(APP)["machines"]] == [before, before]
    assert back[back.index("--file-secret") + 1] == "/secrets/gcp.json=GCP_SA_JSON_B64"  # the key file mounted again
    assert "API_KEYS" in fake_flyctl.app(APP)["secrets"]


@pytest.mark.slow
def test_rollback_redeploys_the_previous_release_image(fake_flyctl, healthy):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    assert invoke("deploy", "--target", "fly", "--tag", "v4", **CONFIG, fly_url=healthy).returncode == 0
    result = invoke("rollback", "--target", "fly", **CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    back = deploys(fake_flyctl)[-1]
    assert back[back.index("--image") + 1] == OLD_IMAGE


@pytest.mark.slow
def test_credentials_are_piped_to_a_staged_secret_never_on_the_command_line(fake_flyctl, tmp_path):
    fake_flyctl.add_app(APP)
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com"}))
    result = invoke("fly.credentials", "--key-file", str(key), **CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    (call,) = [c for c in fake_flyctl.calls() if c["argv"][:2] == ["secrets", "set"]]
    assert call["argv"] == ["secrets", "set", "GCP_SA_JSON_B64=-", "--stage", "--app", APP]
    assert base64.b64decode(call["stdin"]) == key.read_bytes()


@pytest.mark.slow
def test_the_key_secret_is_the_fallback_when_keyless_access_is_not_set_up(fake_flyctl, healthy, tmp_path):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    config = {**CONFIG, "fly_workload_identity_provider": ""}
    refused = invoke("deploy", "--target", "fly", "--tag", "v5", **config, fly_url=healthy)
    assert refused.returncode == 1
    assert "run `invoke gcp.setup --fly`" in refused.stderr and "invoke fly.credentials --key-file" in refused.stderr
    assert deploys(fake_flyctl) == []

    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com"}))
    assert invoke("fly.credentials", "--key-file", str(key), **config).returncode == 0
    result = invoke("deploy", "--target", "fly", "--tag", "v5", **config, fly_url=healthy)
    assert result.returncode == 0, result.stdout + result.stderr
    (deploy,) = deploys(fake_flyctl)
    assert deploy[:deploy.index("--build-arg")][-4:] == ["--file-secret", "/secrets/gcp.json=GCP_SA_JSON_B64",
                           "--env", "GOOGLE_APPLICATION_CREDENTIALS=/secrets/gcp.json"]


def test_logged_out_flyctl_stops_before_any_deploy(fake_flyctl, monkeypatch):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    monkeypatch.setenv("FAKE_FLY_LOGGED_OUT", "1")
    result = invoke("deploy", "--target", "fly", **CONFIG)
    assert result.returncode == 1 and "flyctl auth login" in result.stderr
    assert deploys(fake_flyctl) == []


def test_dry_run_prints_the_commands_and_runs_none(fake_flyctl):
    result = invoke("deploy", "--target", "fly", "--tag", "v9", "--dry-run", **CONFIG)
    assert result.returncode == 0, result.stderr
    assert f"deploy --app {APP} --config fly.toml --wait-timeout 10m --remote-only --image-label v9" in result.stdout
    assert fake_flyctl.calls() == []


@pytest.mark.slow
def test_api_key_makes_a_strong_key_pipes_it_to_the_secret_and_prints_it_once(fake_flyctl):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    result = invoke("fly.api-key", **CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    (call,) = [c for c in fake_flyctl.calls() if c["argv"][:2] == ["secrets", "set"]]
    assert call["argv"] == ["secrets", "set", "API_KEYS=-", "--app", APP]  # never on the command line
    key = call["stdin"]
    assert len(key) >= 43 and set(key) <= set(string.ascii_letters + string.digits + "-_")  # 256 bits, urlsafe
    assert result.stdout.count(key) == 1 and key not in result.stderr
    assert fake_flyctl.state()["apps"][APP]["secrets"]["API_KEYS"]["value"] == key
    assert "ONNX_SERVE_API_KEY" in result.stdout and "machines restart" in result.stdout

    # rotation: the new key beside the old one (given on stdin), then the old one retired
    rotated = invoke("fly.api-key", "--keep", "-", "--stage", stdin=key + "\n", **CONFIG)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.splitlines()[rotated.stdout.splitlines().index(
        "the new key, shown this once (Fly keeps secrets write-only):") + 1]  # fmt: skip
    assert new != key and fake_flyctl.state()["apps"][APP]["secrets"]["API_KEYS"]["value"] == f"{new},{key}"
    retired = invoke("fly.api-key", "--no-new", "--keep", "-", stdin=new, **CONFIG)
    assert retired.returncode == 0, retired.stderr
    assert fake_flyctl.state()["apps"][APP]["secrets"]["API_KEYS"]["value"] == new
    assert new not in retired.stdout and "no new key, 1 kept" in retired.stdout


def test_api_key_refuses_bad_requests_before_calling_flyctl(fake_flyctl):
    weak = invoke("fly.api-key", "--keep", "Qx7wEak", **CONFIG)
    assert weak.returncode == 1 and "16 printable characters" in weak.stderr and "Qx7wEak" not in weak.stderr
    nothing = invoke("fly.api-key", "--no-new", **CONFIG)
    assert nothing.returncode == 1 and "pass --keep KEY" in nothing.stderr
    dry = invoke("fly.api-key", "--dry-run", **CONFIG)
    assert dry.returncode == 0 and f"flyctl secrets set API_KEYS=- --app {APP} < a new key" in dry.stdout
    assert fake_flyctl.calls() == []


@pytest.mark.slow
def test_deploy_to_an_app_with_keys_sends_the_configured_key(fake_flyctl, keyed, monkeypatch):
    fake_flyctl.add_app(APP, image=OLD_IMAGE)
    refused = invoke("deploy", "--target", "fly", "--tag", "k1", **CONFIG, fly_url=keyed)
    assert refused.returncode == 1
    assert "/metadata answered 401" in refused.stderr and "set smoke.api_key or ONNX_SERVE_API_KEY" in refused.stderr
    assert "has no API_KEYS secret, so anyone who finds" in refused.stdout
    passed = invoke("deploy", "--target", "fly", "--tag", "k2", **CONFIG, fly_url=keyed, smoke_api_key=SERVICE_KEY)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    monkeypatch.setenv("ONNX_SERVE_API_KEY", SERVICE_KEY)
    from_env = invoke("deploy", "--target", "fly", "--tag", "k3", **CONFIG, fly_url=keyed)
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr
    for result in (refused, passed, from_env):
        assert SERVICE_KEY not in result.stdout + result.stderr
