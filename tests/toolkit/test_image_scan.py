"""`invoke image.scan` and `deploy.require_scan`: the real gcloud (and its local-extract component, with its test
extraction) against the On-Demand Scanning stand-in; the severity gate, the allowlist and the errors a user meets."""

from __future__ import annotations

import pytest

from tests.support.scanning_stub import OnDemandScanning, finding
from tests.toolkit.deploy_helpers import invoke

IMAGE = "us-central1-docker.pkg.dev/stub-project/onnx-serve/onnx-serve:abc1234"
CONFIG = {"gcp_project": "stub-project", "image_scan_flags": "--fake-extraction"}


@pytest.fixture
def scanning(gcloud_stub, monkeypatch) -> OnDemandScanning:
    api = OnDemandScanning(gcloud_stub)
    gcloud_stub.apply_to(monkeypatch)  # the new endpoint override reaches the tasks' gcloud
    return api


def scan(*args: str, **config: str):
    return invoke("image.scan", "--tag", "abc1234", *args, **{**CONFIG, **config})


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_clean_image_passes_and_the_scan_is_of_the_pushed_image(scanning):
    scanning.findings = [finding("CVE-2025-0001", "LOW", "zlib1g", "1:1.2.13.dfsg-1")]
    done = scan()
    assert done.returncode == 0, done.stderr
    assert "scan passed: 1 finding(s), none above HIGH" in done.stdout
    assert "ok       LOW      CVE-2025-0001" in done.stdout
    [made] = scanning.scans.values()
    assert made["resourceUri"] == IMAGE and made["packages"]  # what gcloud's extractor listed


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_finding_above_the_limit_fails_with_its_id_and_the_fix(scanning):
    scanning.findings = [finding("CVE-2025-1111", "CRITICAL", "openssl", "3.0.11-1~deb12u1", fixed="3.0.15-1~deb12u1"),
                         finding("CVE-2025-2222", "MEDIUM", "tar", "1.34+dfsg-1.2")]  # fmt: skip
    done = scan()
    assert done.returncode == 1
    assert "BLOCKS   CRITICAL CVE-2025-1111        openssl 3.0.11-1~deb12u1 (fixed in 3.0.15-1~deb12u1)" in done.stdout
    assert "1 finding(s) above HIGH" in done.stderr and "CVE-2025-1111" in done.stderr
    assert "image.base_image" in done.stderr and "scan-allowlist.txt" in done.stderr
    # a lower limit blocks the MEDIUM one too
    lower = scan("--max-severity", "low")
    assert lower.returncode == 1 and "2 finding(s) above LOW" in lower.stderr


@pytest.mark.slow
@pytest.mark.gcloud
def test_an_allowlisted_finding_is_accepted_and_shown(scanning, tmp_path):
    scanning.findings = [finding("CVE-2025-1111", "CRITICAL", "openssl", "3.0.11-1~deb12u1")]
    allowlist = tmp_path / "accepted.txt"
    allowlist.write_text("# accepted findings\nCVE-2025-1111  # not reachable: the service makes no TLS server\n")
    done = scan("--allowlist", str(allowlist))
    assert done.returncode == 0, done.stderr
    assert "accepted CRITICAL CVE-2025-1111" in done.stdout


@pytest.mark.gcloud
def test_bad_settings_fail_before_gcloud_runs(scanning, gcloud_stub):
    wrong = scan("--max-severity", "severe")
    assert wrong.returncode == 1 and "image.max_severity must be one of MINIMAL, LOW, MEDIUM, HIGH, CRITICAL" in wrong.stderr
    no_project = scan(gcp_project="")
    assert no_project.returncode == 1 and "gcp.project is not set" in no_project.stderr
    assert gcloud_stub.requests_to(api="ondemandscanning") == []


@pytest.mark.gcloud
def test_a_disabled_scanning_api_says_how_to_enable_it(gcloud_stub):
    # No On-Demand Scanning plugged in: the API answers 404, as a project without it does not serve it.
    done = scan()
    assert done.returncode == 1
    assert "invoke gcp.setup --scanning" in done.stderr


@pytest.mark.gcloud
def test_dry_run_prints_both_gcloud_commands(gcloud_stub):
    done = scan("--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"gcloud artifacts docker images scan {IMAGE} --remote --format=json --project stub-project" in done.stdout
    assert "gcloud artifacts docker images list-vulnerabilities SCAN_NAME --format=json" in done.stdout
    assert gcloud_stub.requests == []


SETUP = {"gcp_project": "stub-project", "model_uri": "gs://my-models/demo.onnx"}


@pytest.mark.slow
@pytest.mark.gcloud
def test_gcp_setup_scanning_enables_the_scanners_once(gcloud_stub):
    gcloud_stub.new_project()
    gcloud_stub.seed_bucket("my-models")
    first = invoke("gcp.setup", "--scanning", **SETUP)
    assert first.returncode == 0, first.stdout + first.stderr
    assert {"containerscanning.googleapis.com", "ondemandscanning.googleapis.com",
            "containeranalysis.googleapis.com"} <= gcloud_stub.admin.enabled  # fmt: skip
    again = invoke("gcp.setup", "--scanning", **SETUP)
    assert again.returncode == 0 and "created" not in again.stdout


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_deploy_that_requires_a_scan_stops_before_cloud_run_on_a_failing_one(scanning, gcloud_stub, healthy):
    from tests.toolkit.test_deploy_cloudrun import CONFIG as DEPLOY

    config = {**DEPLOY, **CONFIG, "deploy_require_scan": "true"}
    scanning.findings = [finding("CVE-2025-1111", "CRITICAL", "openssl", "3.0.11-1~deb12u1")]
    refused = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", **config)
    assert refused.returncode == 1
    assert "1 finding(s) above HIGH" in refused.stderr
    assert len(gcloud_stub.sent_builds()) == 1 and gcloud_stub.sent_services() == []  # built and pushed, not deployed

    scanning.findings = []
    gcloud_stub.state.urls[None] = healthy
    deployed = invoke("deploy", "--target", "cloudrun", "--tag", "abc1234", **config)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "scan passed" in deployed.stdout and gcloud_stub.sent_services()


def test_fly_deploys_cannot_require_an_artifact_registry_scan():
    done = invoke("deploy", "--target", "fly", "--dry-run", fly_app="my-app", deploy_require_scan="true")
    assert done.returncode == 1 and "Fly's registry has no scanner" in done.stderr
