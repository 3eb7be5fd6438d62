"""`invoke release --target cloudrun`, `invoke status` and `invoke rollback` after a release, with the real gcloud
against the Cloud Run stand-in, a stand-in of Cloud Monitoring serving each test's figures, and real services on
loopback as the serving revision's and the candidate tag's URLs."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from tests.support import variants
from tests.support.models import DEMO_MODEL
from tests.support.server import run_service
from tests.support.monitoring_stub import NO_TRAFFIC, RevisionFigures, monitoring_stub  # noqa: F401 (fixture)
from tests.toolkit.deploy_helpers import invoke
from tests.toolkit.test_deploy_cloudrun import CONFIG, IMAGE, SERVICE, serving

OLD_MODEL = "gs://my-models/demo.onnx#1700000000000001"
NEW_MODEL = "gs://my-models/demo-v2.onnx#1700000000000002"
TAG = "m-1700000000000002"


@pytest.fixture
def project(gcloud_stub, monitoring_stub, healthy, tmp_path):
    """A service serving OLD_MODEL on IMAGE:old, the candidate tag reaching a healthy service, fast steps."""
    gcloud_stub.seed_service(SERVICE, f"{IMAGE}:old", containers=[
        {"image": f"{IMAGE}:old", "env": [{"name": "MODEL_URI", "value": OLD_MODEL}]}])
    gcloud_stub.state.urls[None] = healthy
    gcloud_stub.state.urls[TAG] = healthy
    record = tmp_path / "invoke.yaml"
    record.write_text(f"# the project's settings\nmodel:\n  uri: {OLD_MODEL}   # what serves\n  sha256: \"\"\n")
    config = {k: v for k, v in CONFIG.items() if k != "model_uri"}  # the record file says which model serves
    config.update(release_monitoring_endpoint=monitoring_stub.url, release_step_wait="0", release_ingestion_delay="0",
                  release_window="0", release_record=str(record))
    (stable,) = serving(gcloud_stub)
    return config, record, stable


def release(config, *flags, **more):
    return invoke("-f", config["release_record"], "release", "--target", "cloudrun", "--model", NEW_MODEL,
                  "--skip-compare", *flags, **{**config, **more})


def journal(record) -> list[dict]:
    """The releases `invoke release` journaled next to the invoke.yaml `record`."""
    return json.loads(record.with_name(record.stem + ".releases.json").read_text())


def candidate_of(stub, tag: str = TAG) -> str:
    return next(t["revisionName"] for t in stub.traffic(SERVICE) if t.get("tag") == tag)


@pytest.mark.slow
@pytest.mark.gcloud
def test_release_reuses_the_serving_digest_moves_traffic_in_steps_and_records_the_model(gcloud_stub, monitoring_stub,
                                                                                         project):
    config, record, stable = project
    digest = gcloud_stub.revisions(SERVICE)[0]["status"]["imageDigest"]
    result = release(config, "--steps", "10,50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--skip-compare" in result.stdout and "NOT compared" in result.stdout

    update = gcloud_stub.sent_services(SERVICE)[0]
    container = update["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == digest and "@sha256:" in digest  # the serving image by digest: nothing built
    assert {e["name"]: e["value"] for e in container["env"]}["MODEL_URI"] == NEW_MODEL
    assert update["spec"]["traffic"][-1]["tag"] == TAG and not update["spec"]["traffic"][-1].get("percent")
    assert gcloud_stub.sent_builds() == []
    candidate = candidate_of(gcloud_stub)
    # 10% and 50% judged (candidate and stable, two queries each), 100 promotes
    steps = [s["spec"]["traffic"] for s in gcloud_stub.sent_services(SERVICE)[1:]]
    assert [{t["revisionName"]: t["percent"] for t in s if t.get("percent")} for s in steps] == [
        {stable: 90, candidate: 10}, {stable: 50, candidate: 50}, {candidate: 100}]
    assert monitoring_stub.revisions_read() == [candidate, candidate, stable, stable] * 2
    assert serving(gcloud_stub) == {candidate: 100}

    assert yaml.safe_load(record.read_text())["model"]["uri"] == NEW_MODEL
    (entry,) = journal(record)
    assert entry["stable"]["revision"] == stable and entry["stable"]["image"] == digest
    assert [(e["state"], e["detail"]) for e in entry["events"]][3:] == [
        ("step", f"step 1 of 3: 10% to {candidate}, 90% to {stable}"),
        ("step", f"step 2 of 3: 50% to {candidate}, 50% to {stable}"),
        ("step", f"step 3 of 3: 100% to {candidate}, 0% to {stable}"), ("promoted", f"{NEW_MODEL} serves all traffic")]
    assert "# what serves" in record.read_text() and record.read_text().startswith("# the project's settings")

    status = invoke("-f", str(record), "status", "--target", "cloudrun", "--json", **config)
    assert status.returncode == 0, status.stderr
    rows = {row["revision"]: row for row in json.loads(status.stdout)}
    assert rows[candidate]["percent"] == 100 and rows[candidate]["image"] == digest
    assert rows[candidate]["health"]["status"] == "ready" and rows[candidate]["health"]["sha256"]

    # a later code deploy sends the released model, and says so when told to send another
    code = invoke("-f", str(record), "deploy", "--target", "cloudrun", "--tag", "abc1234", "--dry-run", **config)
    assert code.returncode == 0 and f"MODEL_URI={NEW_MODEL}" in code.stdout and "WARNING" not in code.stdout
    edited = record.with_name("edited.yaml")  # model.uri changed by hand after the release
    edited.write_text(record.read_text().replace(NEW_MODEL, OLD_MODEL))
    other = invoke("-f", str(edited), "deploy", "--target", "cloudrun", "--tag", "abc1234", "--dry-run", **config)
    assert f"WARNING: this deploy sends model.uri {OLD_MODEL}, not {NEW_MODEL}" in other.stdout

    back = invoke("-f", str(record), "rollback", "--target", "cloudrun", **config)
    assert back.returncode == 0, back.stdout + back.stderr
    assert serving(gcloud_stub) == {stable: 100}
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL
    assert journal(record)[-1]["state"] == "rolled_back" and "`invoke rollback`" in journal(record)[-1]["events"][-1][
        "detail"]


@pytest.mark.slow
@pytest.mark.gcloud
@pytest.mark.parametrize("figures, reason", [
    (RevisionFigures({"2xx": 950, "5xx": 50}, 120.0), "answered 5xx to 5.00% of 1000 requests (limit 1.00%"),
    (RevisionFigures({"2xx": 1000}, 900.0), "p99 900 ms is 7.50x the stable 120 ms (limit 1.5x)"),
])
def test_a_failed_gate_sends_all_traffic_back_to_the_stable_revision(gcloud_stub, monitoring_stub, project, figures,
                                                                     reason):
    config, record, stable = project
    monitoring_stub.figures[stable] = RevisionFigures({"2xx": 5000, "5xx": 5}, 120.0)
    monitoring_stub.default = figures  # the candidate
    result = release(config)
    assert result.returncode == 1
    assert serving(gcloud_stub) == {stable: 100}
    line = result.stderr.strip().splitlines()[-1]  # the reason, in one line, after gcloud's progress
    assert line.startswith(f"release stopped, traffic 100% on {stable}: candidate {candidate_of(gcloud_stub)}")
    assert reason in line
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL  # nothing recorded
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and reason in last["events"][-1]["detail"]


@pytest.mark.slow
@pytest.mark.gcloud
def test_too_few_requests_hold_the_split_instead_of_promoting(gcloud_stub, monitoring_stub, project):
    config, record, stable = project
    monitoring_stub.default = NO_TRAFFIC
    result = release(config)
    assert result.returncode == 1
    candidate = candidate_of(gcloud_stub)
    assert serving(gcloud_stub) == {stable: 90, candidate: 10}
    line = result.stderr.strip().splitlines()[-1]  # the reason, in one line, after gcloud's progress
    assert f"release held at 10% to {candidate}" in line and "fewer than release.min_requests 100" in line
    assert journal(record)[-1]["state"] == "held" and journal(record)[-1]["percent"] == 10

    # the same command again judges a new window and goes on from the held split, on the same revision
    monitoring_stub.default = RevisionFigures({"2xx": 400}, 100.0)
    again = release(config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming: revision {candidate} already carries tag {TAG}" in again.stdout
    assert len(gcloud_stub.revisions(SERVICE)) == 2 and serving(gcloud_stub) == {candidate: 100}
    shares = [{t["revisionName"]: t["percent"] for t in s["spec"]["traffic"] if t.get("percent")}
              for s in gcloud_stub.sent_services(SERVICE)[2:]]
    assert shares == [{stable: 50, candidate: 50}, {candidate: 100}]
    assert journal(record)[-1]["state"] == "promoted" and journal(record)[-1]["stable"]["revision"] == stable
    assert [e["state"] for e in journal(record)[-1]["events"]][:3] == ["started", "resuming", "deployed"]
    assert [e["state"] for e in journal(record)] == ["held", "promoted"]


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_failed_smoke_test_leaves_traffic_where_it_was(gcloud_stub, monitoring_stub, project, broken):
    config, record, stable = project
    gcloud_stub.state.urls[TAG] = broken
    result = release(config)
    assert result.returncode == 1
    assert serving(gcloud_stub) == {stable: 100}
    assert "smoke test of" in result.stderr and "the model failed to load" in result.stderr
    assert len(gcloud_stub.sent_services(SERVICE)) == 1 and monitoring_stub.queries == []
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and "the model failed to load" in last["events"][-1]["detail"]


@pytest.mark.gcloud
def test_cheap_checks_fail_before_gcloud_runs(gcloud_stub, project):
    config, record, stable = project
    long_name = dict(config, cloudrun_service="a-very-long-service-name-for-models")
    result = invoke("-f", str(record), "release", "--target", "cloudrun", "--model", NEW_MODEL, **long_name)
    assert result.returncode == 1 and "Cloud Run allows 46" in result.stderr
    loose = invoke("-f", str(record), "release", "--target", "cloudrun", "--model", "gs://my-models/v3.onnx", **config)
    assert loose.returncode == 1 and "pin it with #GENERATION or --sha256" in loose.stderr


@pytest.mark.gcloud
def test_dry_run_prints_every_command_and_query_and_runs_none(gcloud_stub, monitoring_stub, project):
    config, record, stable = project
    result = release(config, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert (f"gcloud run services update {SERVICE} --project stub-project --region us-central1 --image "
            "REPOSITORY@sha256:SERVING_DIGEST --update-env-vars") in result.stdout
    assert f"--no-traffic --tag {TAG}" in result.stdout
    assert "--to-revisions CANDIDATE_REVISION=10" in result.stdout
    assert "run.googleapis.com%2Frequest_count" in result.stdout and "ALIGN_PERCENTILE_99" in result.stdout
    assert gcloud_stub.sent_services(SERVICE) == [] and monitoring_stub.queries == []


@pytest.fixture
def in_storage(gcloud_stub, project, emulator, monkeypatch):
    """The serving revision's model as a gs:// object in the storage emulator; returns an upload function."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    generation = emulator.upload("release-models", "demo.onnx", DEMO_MODEL)
    serving_model = f"gs://release-models/demo.onnx#{generation}"
    with gcloud_stub.state.lock:  # the serving revision was deployed with it
        for revision in gcloud_stub.state.revisions.values():
            revision["spec"]["containers"][0]["env"] = [{"name": "MODEL_URI", "value": serving_model}]

    def upload(path) -> tuple[str, str]:
        generation = emulator.upload("release-models", path.name, path)
        return f"gs://release-models/{path.name}#{generation}", f"m-{generation}"

    return upload


@pytest.mark.slow
@pytest.mark.gcloud
def test_the_compare_gate_stops_a_breaking_candidate_before_any_change(gcloud_stub, project, in_storage, tmp_path):
    config, record, stable = project
    model, tag = in_storage(variants.renamed_output(DEMO_MODEL, tmp_path / "renamed.onnx", "probabilities", "probs"))
    result = invoke("-f", str(record), "release", "--target", "cloudrun", "--model", model, **config)
    assert result.returncode == 1
    assert "Signature (baseline -> candidate)" in result.stdout and "FAIL: 1 gate(s) failed" in result.stdout
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("release stopped before any change: the candidate fails the compare: breaking signature")
    assert "probabilities" in line
    assert gcloud_stub.sent_services(SERVICE) == [] and serving(gcloud_stub) == {stable: 100}


SAMPLES = ('{"inputs": {"features": [[0.1, 0.2, 0.3, 0.4]]}}\n'
           '{"inputs": {"features": [[1.0, -1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]]}}\n')


@pytest.mark.slow
@pytest.mark.gcloud
def test_a_compatible_candidate_passes_the_compare_and_its_answers_match_over_http(gcloud_stub, project, in_storage,
                                                                                   healthy, tmp_path):
    config, record, stable = project
    reexported = variants.reexport(DEMO_MODEL, tmp_path / "reexport.onnx")
    model, tag = in_storage(reexported)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(SAMPLES)
    with run_service(str(reexported), tmp_path) as candidate_service:  # a second server, with the candidate's model
        candidate_service.wait_state("ready")
        gcloud_stub.state.urls[tag] = candidate_service.url
        result = invoke("-f", str(record), "release", "--target", "cloudrun", "--model", model, "--samples",
                        str(samples), "--steps", "100", **config, release_max_abs_diff="0.000001",
                        release_min_agreement="1")
    assert result.returncode == 0, result.stdout + result.stderr
    # the smoke test reached the candidate's own server (the re-exported file: other bytes, the same answers)
    assert f"(sha256 {hashlib.sha256(reexported.read_bytes()).hexdigest()})" in result.stdout
    assert "answers on 2 samples, output logits: requests 2, shape_mismatches 0, kind float, max_abs_diff 0.0" in (
        result.stdout)
    candidate = candidate_of(gcloud_stub, tag)
    assert serving(gcloud_stub) == {candidate: 100}
    assert yaml.safe_load(record.read_text())["model"]["uri"] == model
    assert journal(record)[-1]["state"] == "promoted"


def test_a_candidate_whose_answers_differ_over_http_goes_back_before_any_traffic(gcloud_stub, project, in_storage,
                                                                                 tmp_path):
    """The compare passed on the model in storage, but the candidate revision serves something else (here a drifted
    retrain behind the tag URL): the answers over HTTP catch it."""
    config, record, stable = project
    model, tag = in_storage(variants.reexport(DEMO_MODEL, tmp_path / "reexport.onnx"))
    drifted = variants.perturbed(DEMO_MODEL, tmp_path / "drifted.onnx", scale=0.5)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(SAMPLES)
    with run_service(str(drifted), tmp_path) as candidate_service:
        candidate_service.wait_state("ready")
        gcloud_stub.state.urls[tag] = candidate_service.url
        result = invoke("-f", str(record), "release", "--target", "cloudrun", "--model", model, "--samples",
                        str(samples), **config, release_max_abs_diff="0.001")
    assert result.returncode == 1
    assert serving(gcloud_stub) == {stable: 100}
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"release stopped, traffic 100% on {stable}: answers on the samples: ")
    assert "max_abs_diff" in line and "0.001" in line
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and "answers on the samples" in last["events"][-1]["detail"]
    assert yaml.safe_load(record.read_text())["model"]["uri"] != model
