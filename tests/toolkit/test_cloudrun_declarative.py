"""`invoke render --target cloudrun` and `invoke deploy --target cloudrun --declarative` (and `--model-mount`): the
rendered service.yaml validates against the shared Cloud Run v1 schema, and the real gcloud applies it with
`gcloud run services replace` to the local stand-in, keeping the no-traffic tag -> smoke test -> promote flow."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.support.models import ROOT
from tests.toolkit.conftest import SERVICE_KEY
from tests.toolkit.deploy_helpers import invoke
from tests.toolkit.test_deploy_cloudrun import CONFIG, IMAGE, SERVICE, container, serving

SCHEMA = ROOT.parent / "shared" / "schemas" / "cloud-run-v1.schema.json"
MOUNTED = {"name": "model", "csi": {"driver": "gcsfuse.run.googleapis.com", "readOnly": True,
                                   "volumeAttributes": {"bucketName": "my-models"}}}


@pytest.fixture
def manifest_config(tmp_path):
    return {**CONFIG, "cloudrun_manifest": str(tmp_path / "service.yaml")}


def rendered(config: dict, *flags: str) -> dict:
    result = invoke("render", "--target", "cloudrun", "--tag", "abc1234", *flags, **config)
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(open(config["cloudrun_manifest"]))


def validate(service: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(service)


def test_rendered_service_yaml_validates_and_holds_everything_the_deploy_sets(manifest_config):
    service = rendered(manifest_config)
    validate(service)
    assert service["metadata"] == {"name": SERVICE, "labels": {"cloud.googleapis.com/location": "us-central1"}}
    template = service["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "autoscaling.knative.dev/minScale": "0", "autoscaling.knative.dev/maxScale": "10",
        "run.googleapis.com/startup-cpu-boost": "true", "run.googleapis.com/execution-environment": "gen2"}
    spec = template["spec"]
    assert spec["containerConcurrency"] == 16 and spec["timeoutSeconds"] == 60
    assert spec["serviceAccountName"] == CONFIG["cloudrun_service_account"]
    (c,) = spec["containers"]
    assert c["image"] == f"{IMAGE}:abc1234"
    assert {e["name"]: e["value"] for e in c["env"]} == {
        "MODEL_URI": "gs://my-models/demo.onnx", "WEB_CONCURRENCY": "1", "GOOGLE_CLOUD_PROJECT": "stub-project",
        "ORT_INTRA_OP_THREADS": "2"}
    assert c["resources"] == {"limits": {"cpu": "2", "memory": "2Gi"}}
    assert c["startupProbe"] == {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10,
                                 "timeoutSeconds": 5, "failureThreshold": 60}
    assert service["spec"]["traffic"] == [{"percent": 100, "latestRevision": True}]


def test_the_runtime_account_from_gcp_setup_is_the_default(manifest_config):
    service = rendered({**manifest_config, "cloudrun_service_account": ""})
    assert service["spec"]["template"]["spec"]["serviceAccountName"] == \
        "onnx-serve-runtime@stub-project.iam.gserviceaccount.com"


def test_model_mount_renders_a_read_only_bucket_volume_and_points_the_service_at_the_file(manifest_config):
    service = rendered(manifest_config, "--model-mount")
    validate(service)
    spec = service["spec"]["template"]["spec"]
    assert spec["volumes"] == [MOUNTED]
    (c,) = spec["containers"]
    assert c["volumeMounts"] == [{"name": "model", "mountPath": "/mnt/models"}]
    assert {e["name"]: e["value"] for e in c["env"]}["MODEL_URI"] == "/mnt/models/demo.onnx"
    assert service["spec"]["template"]["metadata"]["annotations"]["run.googleapis.com/execution-environment"] == "gen2"


def test_a_pinned_generation_cannot_be_mounted(manifest_config):
    result = invoke("render", "--target", "cloudrun", "--model-mount",
                    **{**manifest_config, "model_uri": "gs://my-models/demo.onnx#1712345678901234"})
    assert result.returncode == 1 and "drop #GENERATION and pin the content with model.sha256" in result.stderr


@pytest.mark.slow
@pytest.mark.gcloud
def test_declarative_first_deploy_sends_the_rendered_service_through_replace(gcloud_stub, healthy, manifest_config):
    gcloud_stub.state.urls[None] = healthy
    result = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", "--declarative", **manifest_config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke test passed" in result.stdout
    applied = yaml.safe_load(open(manifest_config["cloudrun_manifest"]))
    validate(applied)
    (sent,) = gcloud_stub.sent_services(SERVICE)
    assert gcloud_stub.requests_to(api="run", method="POST", path_contains="/services")  # created by replace
    assert sent["spec"]["template"]["spec"] == applied["spec"]["template"]["spec"]
    assert sent["spec"]["template"]["metadata"]["annotations"] == applied["spec"]["template"]["metadata"][
        "annotations"]
    assert sent["spec"]["traffic"] == [{"percent": 100, "latestRevision": True}]
    assert gcloud_stub.is_public(SERVICE)  # replace carries no IAM: the task granted allUsers itself


@pytest.mark.slow
@pytest.mark.gcloud
def test_declarative_update_tags_a_no_traffic_revision_smoke_tests_it_then_promotes(gcloud_stub, healthy,
                                                                                    manifest_config):
    gcloud_stub.seed_service(SERVICE, f"{IMAGE}:old")
    (old,) = serving(gcloud_stub)
    gcloud_stub.state.urls["rev-def5678"] = healthy
    result = invoke("deploy", "--target", "cloudrun", "--tag", "def5678", "--declarative", **manifest_config)
    assert result.returncode == 0, result.stdout + result.stderr

    sent = gcloud_stub.sent_services(SERVICE)[0]  # then update-traffic's
    new = sent["spec"]["template"]["metadata"]["name"]
    assert new.startswith(f"{SERVICE}-rev-def5678-")
    assert container(sent)["image"] == f"{IMAGE}:def5678"
    assert sent["spec"]["traffic"] == [{"percent": 100, "revisionName": old}, {"revisionName": new, "tag": "rev-def5678"}]
    assert result.stdout.index("smoke test passed") < result.stdout.index(f"traffic: 100% to {new}")
    assert serving(gcloud_stub) == {new: 100}

    rolled = invoke("rollback", "--target", "cloudrun", **manifest_config)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert serving(gcloud_stub) == {old: 100}


@pytest.mark.slow
@pytest.mark.gcloud
def test_declarative_failed_smoke_test_leaves_traffic_where_it_was(gcloud_stub, broken, manifest_config):
    gcloud_stub.seed_service(SERVICE, f"{IMAGE}:old")
    before = serving(gcloud_stub)
    gcloud_stub.state.urls["rev-bad0001"] = broken
    result = invoke("deploy", "--target", "cloudrun", "--tag", "bad0001", "--declarative", **manifest_config)
    assert result.returncode == 1
    assert "smoke test failed: the model failed to load" in result.stderr
    assert serving(gcloud_stub) == before
    assert len(gcloud_stub.revisions(SERVICE)) == 2


@pytest.mark.slow
@pytest.mark.gcloud
def test_model_mount_by_flags_sends_the_same_volume_as_the_rendered_file(gcloud_stub, healthy, manifest_config):
    gcloud_stub.state.urls[None] = healthy
    result = invoke("deploy", "--target", "cloudrun", "--tag", "mnt0001", "--model-mount", **manifest_config)
    assert result.returncode == 0, result.stdout + result.stderr
    (sent,) = gcloud_stub.sent_services(SERVICE)
    spec = sent["spec"]["template"]["spec"]
    assert spec["volumes"] == [MOUNTED]
    assert container(sent)["volumeMounts"] == [{"name": "model", "mountPath": "/mnt/models"}]
    assert {e["name"]: e["value"] for e in container(sent)["env"]}["MODEL_URI"] == "/mnt/models/demo.onnx"
    assert sent["spec"]["template"]["metadata"]["annotations"]["run.googleapis.com/execution-environment"] == "gen2"


@pytest.mark.gcloud
def test_declarative_dry_run_prints_the_manifest_and_the_replace_command_and_runs_none(gcloud_stub,
                                                                                       manifest_config):
    result = invoke("deploy", "--target", "cloudrun", "--tag", "dry0001", "--declarative", "--dry-run",
                    **manifest_config)
    assert result.returncode == 0, result.stderr
    assert f"gcloud run services replace {manifest_config['cloudrun_manifest']} --project stub-project" in result.stdout
    assert "tag: rev-dry0001" in result.stdout and "kind: Service" in result.stdout
    assert gcloud_stub.requests == []


@pytest.mark.slow
@pytest.mark.gcloud
def test_api_keys_from_secret_manager_by_flags_and_in_the_rendered_file_alike(gcloud_stub, keyed, manifest_config):
    # IAM stays on (a private service); the keys ride on top, from a secret the runtime account may read.
    config = {**manifest_config, "cloudrun_api_keys_secret": "onnx-serve-api-keys"}
    reference = {"name": "API_KEYS", "valueFrom": {"secretKeyRef": {"name": "onnx-serve-api-keys", "key": "latest"}}}
    service = rendered(config)
    validate(service)
    assert reference in service["spec"]["template"]["spec"]["containers"][0]["env"]

    gcloud_stub.state.urls[None] = keyed
    refused = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", **config)
    assert refused.returncode == 1 and "/metadata answered 401: the service needs an API key" in refused.stderr
    (sent,) = gcloud_stub.sent_services(SERVICE)
    assert reference in container(sent)["env"]
    gcloud_stub.state.urls["rev-def5678"] = keyed  # the next revision's tag URL
    passed = invoke("deploy", "--target", "cloudrun", "--tag", "def5678", **config, smoke_api_key=SERVICE_KEY)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert reference in container(gcloud_stub.sent_services(SERVICE)[-1])["env"]
