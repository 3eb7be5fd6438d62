"""`invoke deploy --target cloudrun` and `invoke rollback` with the real gcloud against a local stand-in of the
Cloud Run and Cloud Build APIs; the smoke test reaches real local services that the stand-in reports as the
service's and the tag's URLs."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.models import DEMO_MODEL
from tests.toolkit.deploy_helpers import invoke

SERVICE = "onnx-serve"
MODEL = "gs://my-models/demo.onnx"
IMAGE = "us-central1-docker.pkg.dev/stub-project/onnx-serve/onnx-serve"
CONFIG = dict(
    gcp_project="stub-project", model_uri=MODEL, cloudrun_build="cloudbuild", cloudrun_public="true",
    cloudrun_service_account="runtime@stub-project.iam.gserviceaccount.com", smoke_timeout="30",
)


def container(service: dict) -> dict:
    return service["spec"]["template"]["spec"]["containers"][0]


def serving(stub) -> dict[str, int]:
    return {t["revisionName"]: t["percent"] for t in stub.traffic(SERVICE) if t.get("percent")}


@pytest.mark.slow
@pytest.mark.gcloud
def test_first_deploy_builds_on_cloud_build_creates_the_service_and_smoke_tests_it(gcloud_stub, healthy):
    gcloud_stub.state.urls[None] = healthy
    result = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", **CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke test passed" in result.stdout

    (build,) = gcloud_stub.sent_builds()
    assert [step["id"] for step in build["steps"]] == ["build", "push", "deploy"]
    assert build["substitutions"] | {"_TAG": "abc1234", "_DEPLOY": "false", "_SERVICE": SERVICE} == build["substitutions"]

    (created,) = gcloud_stub.sent_services(SERVICE)
    spec = created["spec"]["template"]["spec"]
    c = container(created)
    assert c["image"] == f"{IMAGE}:abc1234"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MODEL_URI"] == MODEL and env["WEB_CONCURRENCY"] == "1" and env["ORT_INTRA_OP_THREADS"] == "2"
    assert c["ports"] == [{"containerPort": 8080}]
    assert c["startupProbe"] == {
        "httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 60
    }
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    annotations = created["spec"]["template"]["metadata"]["annotations"]
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "True"
    assert annotations["run.googleapis.com/execution-environment"] == "gen2"
    assert annotations["autoscaling.knative.dev/maxScale"] == "10"
    assert spec["containerConcurrency"] == 16 and spec["timeoutSeconds"] == 60
    assert spec["serviceAccountName"] == CONFIG["cloudrun_service_account"]
    assert "traffic" not in created["spec"]  # a new service: all traffic to its first revision
    assert gcloud_stub.is_public(SERVICE)


@pytest.mark.slow
@pytest.mark.gcloud
def test_update_deploys_a_tagged_revision_with_no_traffic_and_moves_traffic_after_the_smoke_test(
    gcloud_stub, healthy
):
    gcloud_stub.seed_service(SERVICE, f"{IMAGE}:old")
    (old,) = serving(gcloud_stub)
    gcloud_stub.state.urls["rev-def5678"] = healthy
    result = invoke("deploy", "--target", "cloudrun", "--tag", "def5678", **CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr

    update = gcloud_stub.sent_services(SERVICE)[0]
    new = update["spec"]["template"]["metadata"]["name"]
    assert container(update)["image"] == f"{IMAGE}:def5678"
    assert update["spec"]["traffic"] == [{"percent": 100, "revisionName": old}, {"revisionName": new, "tag": "rev-def5678"}]
    assert serving(gcloud_stub) == {new: 100}
    # the smoke test ran against the tag's URL before traffic moved
    assert result.stdout.index(f"smoke test: {healthy}") < result.stdout.index("smoke test passed") < result.stdout.index(
        f"traffic: 100% to {new}")

    rolled = invoke("rollback", "--target", "cloudrun", **CONFIG)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert serving(gcloud_stub) == {old: 100}


@pytest.mark.slow
@pytest.mark.gcloud
def test_failed_smoke_test_leaves_traffic_on_the_previous_revision(gcloud_stub, broken):
    gcloud_stub.seed_service(SERVICE, f"{IMAGE}:old")
    before = serving(gcloud_stub)
    gcloud_stub.state.urls["rev-bad0001"] = broken
    result = invoke("deploy", "--target", "cloudrun", "--tag", "bad0001", **CONFIG)
    assert result.returncode == 1
    assert "smoke test failed: the model failed to load" in result.stderr
    assert f"traffic stays on {next(iter(before))}" in result.stderr
    assert serving(gcloud_stub) == before
    assert len(gcloud_stub.sent_services(SERVICE)) == 1  # the deploy only: no traffic change followed
    assert len(gcloud_stub.revisions(SERVICE)) == 2  # the failed candidate stays, tagged, for inspection


@pytest.mark.slow
@pytest.mark.gcloud
def test_expected_sha256_is_passed_to_the_service_and_checked_by_the_smoke_test(gcloud_stub, healthy):
    digest = hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()
    gcloud_stub.state.urls[None] = healthy
    wrong = invoke("deploy", "--target", "cloudrun", "--tag", "sha0001", **CONFIG, model_sha256="0" * 64)
    assert wrong.returncode == 1 and "expected " + "0" * 64 in wrong.stderr
    env = {e["name"]: e["value"] for e in container(gcloud_stub.sent_services(SERVICE)[0])["env"]}
    assert env["MODEL_SHA256"] == "0" * 64
    gcloud_stub.state.urls["rev-sha0002"] = healthy
    right = invoke("deploy", "--target", "cloudrun", "--tag", "sha0002", **CONFIG, model_sha256=digest)
    assert right.returncode == 0, right.stderr


@pytest.mark.gcloud
def test_dry_run_prints_every_command_and_runs_none(gcloud_stub):
    result = invoke("deploy", "--target", "cloudrun", "--tag", "dry0001", "--dry-run", **CONFIG)
    assert result.returncode == 0, result.stderr
    assert "gcloud builds submit --project stub-project --config cloudbuild.yaml" in result.stdout
    assert f"gcloud run deploy {SERVICE} --image {IMAGE}:dry0001" in result.stdout
    assert "--no-traffic --tag rev-dry0001" in result.stdout
    assert "gcloud run services update-traffic" in result.stdout
    assert gcloud_stub.requests == [] and gcloud_stub.calls == []


@pytest.mark.gcloud
@pytest.mark.parametrize(
    "config, message",
    [
        ({"gcp_project": ""}, "gcp.project is not set"),
        ({"model_uri": "models/demo.onnx"}, "Cloud Run downloads the model from Cloud Storage"),
    ],
)
def test_cheap_checks_fail_first_with_the_fix(gcloud_stub, config, message):
    result = invoke("deploy", "--target", "cloudrun", **{**CONFIG, **config})
    assert result.returncode == 1 and message in result.stderr
    assert gcloud_stub.requests == []
