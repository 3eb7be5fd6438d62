"""`invoke gcp.setup` with the real gcloud against the stand-in in its "new, empty project" mode: only the APIs a new
project has answer, Cloud Build cannot push to a missing repository and Cloud Run refuses a runtime account that does
not exist or that the deployer may not act as. So a deploy works only if the set-up really made what it needs."""

from __future__ import annotations

import pytest

from tests.support.gcloud_stub_admin import DEPLOYER
from tests.toolkit.deploy_helpers import invoke

SERVICE = "onnx-serve"
RUNTIME = "onnx-serve-runtime@stub-project.iam.gserviceaccount.com"
CONFIG = dict(gcp_project="stub-project", model_uri="gs://my-models/demo.onnx", cloudrun_build="cloudbuild",
              cloudrun_public="true", smoke_timeout="30")
FLY = dict(CONFIG, fly_app="my-onnx-app", fly_org="acme")
PROVIDER = "projects/123456789012/locations/global/workloadIdentityPools/fly/providers/fly-my-onnx-app"


def writes(stub) -> list:
    return [r for r in stub.requests if r.method in {"POST", "PUT", "PATCH", "DELETE"}
            and not r.path.endswith(":getIamPolicy")]


@pytest.fixture
def empty_project(gcloud_stub):
    gcloud_stub.new_project()
    gcloud_stub.seed_bucket("my-models")
    return gcloud_stub


@pytest.mark.slow
@pytest.mark.gcloud
def test_an_empty_project_goes_to_a_smoke_tested_service_running_as_the_least_privilege_account(empty_project, healthy):
    stub = empty_project
    before = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", **CONFIG)
    assert before.returncode == 1
    assert "run `invoke gcp.setup` once to make the project ready" in before.stderr
    assert stub.sent_builds() == [] and stub.sent_services() == []

    setup = invoke("gcp.setup", **CONFIG)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert {"run.googleapis.com", "artifactregistry.googleapis.com", "cloudbuild.googleapis.com",
            "iam.googleapis.com"} <= stub.admin.enabled
    assert stub.admin.repositories[("us-central1", "onnx-serve")]["format"] == "DOCKER"
    assert RUNTIME in stub.admin.service_accounts
    # reads the model's bucket, and nothing else: the only grant it has is on that bucket
    assert stub.admin.members("bucket/my-models", "roles/storage.objectViewer") == [f"serviceAccount:{RUNTIME}"]
    assert [r for r in stub.requests if ":setIamPolicy" in r.path and "/projects/stub-project" in r.path
            and "/serviceAccounts/" not in r.path] == []
    assert stub.admin.members(f"sa/{RUNTIME}", "roles/iam.serviceAccountUser") == [f"user:{DEPLOYER}"]
    assert setup.stdout.count("created  ") == 5 and "5 change(s) made" in setup.stdout

    made = len(writes(stub))
    again = invoke("gcp.setup", **CONFIG)
    assert again.returncode == 0, again.stderr
    assert "nothing to change, it was already set up" in again.stdout and "created" not in again.stdout
    assert len(writes(stub)) == made

    stub.state.urls[None] = healthy
    deployed = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", **CONFIG)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "smoke test passed" in deployed.stdout
    (created,) = stub.sent_services(SERVICE)
    assert created["spec"]["template"]["spec"]["serviceAccountName"] == RUNTIME


@pytest.mark.slow
@pytest.mark.gcloud
def test_fly_trust_is_a_pool_and_provider_for_this_app_only_bound_to_the_runtime_account(empty_project):
    stub = empty_project
    setup = invoke("gcp.setup", "--fly", "--no-cloudrun", **FLY)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert {"sts.googleapis.com", "iamcredentials.googleapis.com", "iam.googleapis.com"} <= stub.admin.enabled
    assert "run.googleapis.com" not in stub.admin.enabled and stub.admin.repositories == {}

    provider = stub.admin.providers[("fly", "fly-my-onnx-app")]
    assert provider["name"] == PROVIDER
    assert provider["oidc"]["issuerUri"] == "https://oidc.fly.io/acme"
    assert provider["attributeCondition"] == "assertion.org_name == 'acme' && assertion.app_name == 'my-onnx-app'"
    assert provider["attributeMapping"]["google.subject"] == "assertion.sub"
    assert provider["attributeMapping"]["attribute.app_name"] == "assertion.app_name"
    assert stub.admin.members(f"sa/{RUNTIME}", "roles/iam.workloadIdentityUser") == [
        "principalSet://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/fly/"
        "attribute.app_name/my-onnx-app"]
    assert stub.admin.members("bucket/my-models", "roles/storage.objectViewer") == [f"serviceAccount:{RUNTIME}"]
    assert f"workload_identity_provider: {PROVIDER}" in setup.stdout
    assert f'GCP_SERVICE_ACCOUNT = "{RUNTIME}"' in setup.stdout

    both = invoke("gcp.setup", "--fly", **FLY)  # later also Cloud Run: one more grant on the same account
    assert both.returncode == 0, both.stdout + both.stderr
    assert "created  the deployer may act as" in both.stdout and "ok       OIDC provider" in both.stdout
    assert stub.admin.members(f"sa/{RUNTIME}", "roles/iam.serviceAccountUser") == [f"user:{DEPLOYER}"]
    assert len(stub.admin.members(f"sa/{RUNTIME}", "roles/iam.workloadIdentityUser")) == 1


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_missing_permission_is_named_with_the_grant_that_fixes_it(empty_project):
    empty_project.fail_next(403, "Permission 'iam.serviceAccounts.create' denied on resource (or it may not exist).",
                            method="POST", path_contains="/serviceAccounts")
    result = invoke("gcp.setup", **CONFIG)
    assert result.returncode == 1
    assert f"user:{DEPLOYER} lacks permission iam.serviceAccounts.create in project stub-project" in result.stderr
    assert (f"gcloud projects add-iam-policy-binding stub-project --member=user:{DEPLOYER} "
            "--role=roles/iam.serviceAccountAdmin") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_disabled_api_is_named_with_the_command_that_enables_it(empty_project):
    empty_project.admin.enabled.discard("serviceusage.googleapis.com")
    result = invoke("gcp.setup", **CONFIG)
    assert result.returncode == 1
    assert "fix: gcloud services enable serviceusage.googleapis.com --project stub-project" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_missing_model_bucket_says_how_to_create_it(gcloud_stub):
    result = invoke("gcp.setup", **CONFIG)
    assert result.returncode == 1
    assert "bucket gs://my-models (from model.uri) does not exist" in result.stderr
    assert "gcloud storage buckets create gs://my-models" in result.stderr


@pytest.mark.gcloud
def test_dry_run_prints_every_command_and_calls_no_api(gcloud_stub):
    result = invoke("gcp.setup", "--fly", "--dry-run", **FLY)
    assert result.returncode == 0, result.stderr
    for command in [
        "gcloud services enable iam.googleapis.com run.googleapis.com artifactregistry.googleapis.com "
        "cloudbuild.googleapis.com sts.googleapis.com iamcredentials.googleapis.com --project stub-project",
        "gcloud artifacts repositories create onnx-serve --repository-format=docker --location us-central1",
        "gcloud iam service-accounts create onnx-serve-runtime --project stub-project",
        f"gcloud storage buckets add-iam-policy-binding gs://my-models --member=serviceAccount:{RUNTIME} "
        "--role=roles/storage.objectViewer",
        f"--member=user:{DEPLOYER} --role=roles/iam.serviceAccountUser",
        "gcloud iam workload-identity-pools create fly --location=global",
        "--issuer-uri=https://oidc.fly.io/acme",
        "--role=roles/iam.workloadIdentityUser",
        f"gcloud projects add-iam-policy-binding stub-project --member=user:{DEPLOYER} --role=roles/monitoring.viewer",
    ]:
        assert command in result.stdout
    assert gcloud_stub.requests == []
