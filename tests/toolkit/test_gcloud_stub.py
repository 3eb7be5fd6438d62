"""The gcloud stub answers the real gcloud binary the way Cloud Run and Cloud Build do.

Each gcloud call costs 1.3-2 s of start-up, so the tests share calls where a scenario allows it and seed state
directly (`seed_service`) where the gcloud path that made it is tested elsewhere.
"""

import io
import json
import re
import subprocess
import tarfile

import pytest

from tests.support.gcloud_stub import ApiError, _check_build, _selector_matches

REGION = ["--region", "us-central1"]
IMAGE = "us-central1-docker.pkg.dev/stub-project/onnx-serve/onnx-serve"
PROBE = "httpGet.path=/health/ready,httpGet.port=8080,periodSeconds=5,timeoutSeconds=3,failureThreshold=24"


@pytest.mark.slow
@pytest.mark.gcloud
def test_first_deploy_creates_a_ready_service_from_what_gcloud_sent(gcloud_stub):
    gcloud_stub.gcloud("run", "deploy", "svc", "--image", f"{IMAGE}:v1", *REGION, "--port", "8080",
                       "--set-env-vars", "A=B", "--startup-probe", PROBE, "--cpu-boost", "--cpu", "2",
                       "--memory", "2Gi", "--concurrency", "16", "--timeout", "60s",
                       "--service-account", "runtime@stub-project.iam.gserviceaccount.com")

    (sent,) = gcloud_stub.sent_services("svc")
    template = sent["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["image"] == f"{IMAGE}:v1"
    assert container["env"] == [{"name": "A", "value": "B"}]
    assert container["ports"] == [{"containerPort": 8080}]
    assert container["startupProbe"] == {"httpGet": {"path": "/health/ready", "port": 8080}, "periodSeconds": 5,
                                         "timeoutSeconds": 3, "failureThreshold": 24}
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    # gcloud writes Python's str(bool) into annotations
    assert template["metadata"]["annotations"]["run.googleapis.com/startup-cpu-boost"] == "True"
    assert template["spec"]["containerConcurrency"] == 16
    assert template["spec"]["timeoutSeconds"] == 60
    assert template["spec"]["serviceAccountName"] == "runtime@stub-project.iam.gserviceaccount.com"
    assert "traffic" not in sent["spec"]

    service = gcloud_stub.service("svc")
    (revision,) = gcloud_stub.revisions("svc")
    assert re.fullmatch(r"svc-00001-[a-z]{3}", revision["metadata"]["name"])
    assert service["status"]["latestReadyRevisionName"] == revision["metadata"]["name"]
    assert {c["type"]: c["status"] for c in service["status"]["conditions"]}["Ready"] == "True"
    assert gcloud_stub.traffic("svc") == [
        {"revisionName": revision["metadata"]["name"], "latestRevision": True, "percent": 100}]

    # the fixture points os.environ at the stub, so a task's plain `gcloud ...` reaches it too
    described = subprocess.run(["gcloud", "run", "services", "describe", "svc", *REGION,
                                "--format=value(status.url)"], capture_output=True, text=True, check=True)
    assert described.stdout.strip() == service["status"]["url"]
    assert re.fullmatch(r"https://svc-[0-9a-f]{10}-uc\.a\.run\.app", service["status"]["url"])


@pytest.mark.gcloud
def test_no_traffic_on_a_new_service_is_refused_by_gcloud_before_it_creates_anything(gcloud_stub):
    result = gcloud_stub.gcloud("run", "deploy", "svc", "--image", f"{IMAGE}:v1", *REGION, "--no-traffic",
                                "--tag", "cand", check=False)

    assert result.returncode == 1
    assert "--no-traffic not supported when creating a new service" in result.stderr
    assert gcloud_stub.sent_services() == []
    assert gcloud_stub.services == {}


@pytest.mark.slow
@pytest.mark.gcloud
def test_tagged_no_traffic_deploy_then_promote_rollback_and_back_to_latest(gcloud_stub):
    gcloud_stub.seed_service("svc", f"{IMAGE}:v1")
    (first,) = [r["metadata"]["name"] for r in gcloud_stub.revisions("svc")]

    deployed = gcloud_stub.gcloud("run", "deploy", "svc", "--image", f"{IMAGE}:v2", *REGION, "--no-traffic",
                                  "--tag", "cand")

    # gcloud names the revision itself when --tag is given, and pins traffic to the serving revision
    sent = gcloud_stub.sent_services("svc")[-1]
    second = sent["spec"]["template"]["metadata"]["name"]
    assert re.fullmatch(r"svc-00002-[a-z]{3}", second)
    assert sent["spec"]["traffic"] == [{"percent": 100, "revisionName": first},
                                       {"revisionName": second, "tag": "cand"}]
    tag_url = f"https://cand---{gcloud_stub.service('svc')['status']['url'][len('https://'):]}"
    assert gcloud_stub.traffic("svc") == [{"revisionName": first, "percent": 100},
                                          {"revisionName": second, "tag": "cand", "url": tag_url}]
    assert tag_url in deployed.stderr

    gcloud_stub.gcloud("run", "services", "update-traffic", "svc", *REGION, "--to-tags", "cand=100")
    traffic = [(t["revisionName"], t.get("percent")) for t in gcloud_stub.traffic("svc")]
    assert traffic == [(second, 100), (second, None)]

    gcloud_stub.gcloud("run", "services", "update-traffic", "svc", *REGION, "--to-revisions", f"{first}=100")
    assert {t["revisionName"]: t.get("percent") for t in gcloud_stub.traffic("svc") if t.get("percent")} == {
        first: 100}

    gcloud_stub.gcloud("run", "services", "update-traffic", "svc", *REGION, "--to-latest")
    assert gcloud_stub.service("svc")["spec"]["traffic"][0] == {"latestRevision": True, "percent": 100}
    assert gcloud_stub.traffic("svc")[0] == {"revisionName": second, "latestRevision": True, "percent": 100}
    assert len(gcloud_stub.revisions("svc")) == 2  # traffic changes make no revision

    listed = gcloud_stub.gcloud("run", "revisions", "list", "--service", "svc", *REGION, "--format=json")
    assert sorted(r["metadata"]["name"] for r in json.loads(listed.stdout)) == sorted([first, second])


@pytest.mark.gcloud
def test_allow_unauthenticated_binds_all_users_as_invoker(gcloud_stub):
    gcloud_stub.gcloud("run", "deploy", "pub", "--image", f"{IMAGE}:v1", *REGION, "--allow-unauthenticated")

    assert gcloud_stub.is_public("pub")
    assert [r.path.rsplit(":", 1)[-1] for r in gcloud_stub.requests_to(path_contains="IamPolicy")] == [
        "getIamPolicy", "setIamPolicy"]


@pytest.mark.gcloud
def test_an_injected_4xx_fails_the_next_write_and_changes_nothing(gcloud_stub):
    gcloud_stub.seed_service("svc", f"{IMAGE}:v1")
    gcloud_stub.fail_next(403, "Permission 'run.services.update' denied on resource 'svc'.")

    result = gcloud_stub.gcloud("run", "deploy", "svc", "--image", f"{IMAGE}:v2", *REGION, check=False)

    assert result.returncode == 1
    assert "PERMISSION_DENIED: Permission 'run.services.update' denied" in result.stderr
    assert len(gcloud_stub.revisions("svc")) == 1
    assert gcloud_stub.requests[-1].status == 403


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_revision_that_fails_its_startup_probe_fails_the_deploy_and_keeps_the_old_one_serving(gcloud_stub):
    gcloud_stub.seed_service("svc", f"{IMAGE}:v1")
    (first,) = [r["metadata"]["name"] for r in gcloud_stub.revisions("svc")]
    gcloud_stub.fail_next_revision("The user-provided container failed the configured startup probe checks.")

    result = gcloud_stub.gcloud("run", "deploy", "svc", "--image", f"{IMAGE}:v2", *REGION, check=False)

    assert result.returncode == 1
    assert "is not ready and cannot serve traffic" in result.stderr
    assert gcloud_stub.traffic("svc") == [{"revisionName": first, "latestRevision": True, "percent": 100}]


@pytest.mark.slow
@pytest.mark.gcloud
def test_builds_submit_uploads_the_source_and_sends_steps_and_substitutions(gcloud_stub, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.py").write_text("print('hello')\n")
    (source / "cloudbuild.yaml").write_text(
        "steps:\n"
        "- id: build\n"
        "  name: gcr.io/cloud-builders/docker\n"
        "  args: [build, -t, '${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPO}/svc:$SHORT_SHA', .]\n"
        "images: ['${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPO}/svc:$SHORT_SHA']\n"
    )

    result = gcloud_stub.gcloud("builds", "submit", "--config", "cloudbuild.yaml",
                                "--substitutions", "_REGION=us-central1,_REPO=models,SHORT_SHA=abc1234", ".",
                                cwd=source)

    (build,) = gcloud_stub.sent_builds()
    assert build["steps"] == [{"id": "build", "name": "gcr.io/cloud-builders/docker",
                               "args": ["build", "-t", "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPO}/svc:$SHORT_SHA",
                                        "."]}]
    assert build["substitutions"] == {"_REGION": "us-central1", "_REPO": "models", "SHORT_SHA": "abc1234"}
    staged = build["source"]["storageSource"]
    assert staged["bucket"] == "stub-project_cloudbuild"
    with tarfile.open(fileobj=io.BytesIO(gcloud_stub.objects[(staged["bucket"], staged["object"])])) as tar:
        assert {"app.py", "cloudbuild.yaml"} <= set(tar.getnames())
    assert gcloud_stub.builds[0]["status"] == "SUCCESS"
    # the build log comes through the TLS tunnel to storage.googleapis.com, with substitutions applied
    assert "Step #0 - \"build\": gcr.io/cloud-builders/docker build -t " \
           "us-central1-docker.pkg.dev/stub-project/models/svc:abc1234 ." in result.stdout


@pytest.mark.slow
@pytest.mark.gcloud
def test_builds_submit_fails_on_an_unused_substitution_as_cloud_build_does(gcloud_stub, tmp_path):
    (tmp_path / "cloudbuild.yaml").write_text("steps: [{name: gcr.io/cloud-builders/docker, args: [version]}]\n")

    result = gcloud_stub.gcloud("builds", "submit", "--config", "cloudbuild.yaml", "--substitutions", "_UNUSED=1",
                                ".", cwd=tmp_path, check=False)

    assert result.returncode == 1
    assert 'key "_UNUSED" in the substitution data is not matched in the template' in result.stderr


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_failed_build_fails_builds_submit(gcloud_stub, tmp_path):
    (tmp_path / "cloudbuild.yaml").write_text(
        "steps: [{name: gcr.io/cloud-builders/docker, args: [version]}]\noptions: {logging: CLOUD_LOGGING_ONLY}\n")
    gcloud_stub.fail_next_build(detail="Build step 0 exited 1")

    result = gcloud_stub.gcloud("builds", "submit", "--config", "cloudbuild.yaml", "--async", ".", cwd=tmp_path)
    assert result.returncode == 0  # --async does not wait for the outcome
    result = gcloud_stub.gcloud("builds", "submit", "--config", "cloudbuild.yaml", ".", cwd=tmp_path, check=False)

    assert result.returncode == 1
    assert 'completed with status "FAILURE"' in result.stderr


@pytest.mark.parametrize(("build", "message"), [
    ({"steps": [{"name": "x", "args": ["$_A"]}]}, 'key in the template "_A" is not matched in the substitution data'),
    ({"steps": [{"name": "x", "args": ["$FOO"]}]}, 'key in the template "FOO" is not a valid built-in substitution'),
    ({"steps": [{"name": "x"}], "substitutions": {"LOWER": "1"}}, 'substitution key "LOWER" does not respect'),
    ({"steps": [{"name": "x", "waitFor": ["nope"]}]}, 'depends on "nope", which has not been defined'),
    ({"steps": []}, "no build steps are specified"),
])
def test_build_checks_match_cloud_builds_messages(build, message):
    with pytest.raises(ApiError, match=re.escape(message)):
        _check_build(build)


def test_build_checks_accept_escapes_builtins_and_loose_substitutions():
    _check_build({"steps": [{"name": "x", "args": ["$$HOME", "$PROJECT_ID", "${SHORT_SHA}"]}]})
    _check_build({"steps": [{"name": "x"}], "substitutions": {"_UNUSED": "1"},
                  "options": {"substitutionOption": "ALLOW_LOOSE"}})


def test_label_selectors_as_gcloud_writes_them():
    labels = {"serving.knative.dev/service": "svc", "client.knative.dev/nonce": "abc"}
    assert _selector_matches("serving.knative.dev/service = svc", labels)
    assert _selector_matches("serving.knative.dev/service=svc,client.knative.dev/nonce in (abc, def)", labels)
    assert not _selector_matches("serving.knative.dev/service = other", labels)


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_new_project_refuses_what_is_not_set_up_as_google_does(gcloud_stub):
    gcloud_stub.new_project()
    deploy = ["run", "deploy", "svc", "--image", f"{IMAGE}:v1", *REGION,
              "--service-account", "runtime@stub-project.iam.gserviceaccount.com"]
    off = gcloud_stub.gcloud(*deploy, check=False)
    assert off.returncode == 1 and "Cloud Run Admin API has not been used in project 123456789012" in off.stderr

    gcloud_stub.gcloud("services", "enable", "run.googleapis.com", "iam.googleapis.com")
    assert "run.googleapis.com" in gcloud_stub.gcloud("services", "list", "--enabled",
                                                      "--format=value(config.name)").stdout.split()
    missing = gcloud_stub.gcloud(*deploy, check=False)
    assert missing.returncode == 1 and "iam.serviceaccounts.actAs" in missing.stderr
    assert gcloud_stub.services == {}

    gcloud_stub.gcloud("iam", "service-accounts", "create", "runtime")
    gcloud_stub.gcloud("iam", "service-accounts", "add-iam-policy-binding",
                       "runtime@stub-project.iam.gserviceaccount.com", "--member=user:stub-user@example.com",
                       "--role=roles/iam.serviceAccountUser")
    gcloud_stub.gcloud(*deploy)
    assert gcloud_stub.service("svc")["spec"]["template"]["spec"]["serviceAccountName"] == \
        "runtime@stub-project.iam.gserviceaccount.com"


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_model_release_revision_reuses_the_image_digest_and_traffic_moves_in_steps(gcloud_stub):
    """What `invoke release` sends: `services update` with the serving revision's digest, the model env, no
    traffic and a tag; then `update-traffic --to-revisions CAND=P`, gcloud giving the rest to the serving one."""
    gcloud_stub.seed_service("svc", f"{IMAGE}:v1", containers=[
        {"image": f"{IMAGE}:v1", "env": [{"name": "MODEL_URI", "value": "gs://b/v1.onnx"}]}])
    (first,) = gcloud_stub.revisions("svc")
    digest = gcloud_stub.gcloud("run", "revisions", "describe", first["metadata"]["name"], *REGION,
                                "--format=value(status.imageDigest)").stdout.strip()
    assert re.fullmatch(re.escape(IMAGE) + r"@sha256:[0-9a-f]{64}", digest)

    gcloud_stub.gcloud("run", "services", "update", "svc", *REGION, "--image", digest, "--update-env-vars",
                       "^@^MODEL_URI=gs://b/v2.onnx#12@MODEL_SHA256=", "--no-traffic", "--tag", "m-12", "--quiet")
    first_name, second = first["metadata"]["name"], gcloud_stub.revisions("svc")[-1]
    assert second["status"]["imageDigest"] == digest  # the same image: nothing built
    env = {e["name"]: e.get("value", "") for e in second["spec"]["containers"][0]["env"]}
    assert env == {"MODEL_URI": "gs://b/v2.onnx#12", "MODEL_SHA256": ""}
    name = second["metadata"]["name"]

    for percent in (10, 50):
        gcloud_stub.gcloud("run", "services", "update-traffic", "svc", *REGION, "--to-revisions", f"{name}={percent}")
        shares = {t["revisionName"]: t["percent"] for t in gcloud_stub.traffic("svc") if t.get("percent")}
        assert shares == {first_name: 100 - percent, name: percent}
    assert any(t.get("tag") == "m-12" and t["revisionName"] == name for t in gcloud_stub.traffic("svc"))
