"""The parts of `invoke release` that need no platform: the step gate's verdicts, the plan's checks, the record in
invoke.yaml, Cloud Monitoring's figures (from its stand-in) and what `status` reads from /health."""

from __future__ import annotations

import copy
import socket
import subprocess

import pytest
import yaml
from invoke import Config, Context, Exit

from tests.support import fake_service
from tests.support.monitoring_stub import NO_TRAFFIC, RevisionFigures, monitoring_stub  # noqa: F401
from toolkit import monitoring, release_core as release, release_journal, smoke
from toolkit.defaults import DEFAULTS
from toolkit.monitoring import Figures


def context(**release_settings) -> Context:
    settings = copy.deepcopy(DEFAULTS)
    settings["gcp"]["project"] = "stub-project"
    settings["release"].update(release_settings)
    return Context(Config(overrides=settings))


STABLE = Figures("svc-00001-abc", 5000, 5, 100.0)


@pytest.mark.parametrize("candidate, action, words", [
    (Figures("cand", 1000, 0, 110.0), "advance", "1000 requests, 0 5xx"),
    (Figures("cand", 1000, 20, 110.0), "rollback", "answered 5xx to 2.00% of 1000 requests (limit 1.00%"),
    (Figures("cand", 1000, 0, 151.0), "rollback", "p99 151 ms is 1.51x the stable 100 ms (limit 1.5x)"),
    (Figures("cand", 1000, 0, 150.0), "advance", ""),  # at the limit, not over it
    (Figures("cand", 99, 0, 100.0), "hold", "had 99 requests in the window, fewer than release.min_requests 100"),
    (Figures("cand", 0, 0, None), "hold", "had 0 requests"),
    (Figures("cand", 40, 10, 100.0), "rollback", "answered 5xx to 25.00% of 40"),  # a burst beats a thin window
])
def test_a_step_is_judged_against_the_stable_revision(candidate, action, words):
    verdict = release.judge(context(), candidate, STABLE)
    assert verdict.action == action and words in verdict.reason


def test_a_candidate_no_worse_than_a_failing_stable_revision_is_not_blamed():
    failing_stable = Figures("svc-00001-abc", 1000, 50, 100.0)
    assert release.judge(context(), Figures("cand", 1000, 30, 100.0), failing_stable).action == "advance"


@pytest.mark.parametrize("text, steps", [("10,50,100", [10, 50, 100]), ("5, 20", [5, 20, 100]), ("100", [100])])
def test_steps_end_at_100(text, steps):
    assert release.parse_steps(text) == steps


@pytest.mark.parametrize("text", ["50,10", "0,100", "10,10", "ten", "150"])
def test_bad_steps_say_the_form(text):
    with pytest.raises(Exit, match="e.g. 10,50,100"):
        release.parse_steps(text)


@pytest.mark.parametrize("model, sha256, message", [
    ("models/v2.onnx", "", "a release serves a model from Cloud Storage"),
    ("gs://b/v2.onnx", "", "pin it with #GENERATION or --sha256"),
    ("gs://b/v2.onnx#latest", "", "is not a storage generation"),
    ("gs://b/v2.onnx", "abc", "is not a sha256 hex digest"),
])
def test_a_release_needs_a_pinned_cloud_storage_model(model, sha256, message):
    with pytest.raises(Exit, match=message):
        release.make_plan(context(), "cloudrun", model, sha256, "", "", None, True, False)


def test_samples_are_jsonl_bodies(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"inputs": {"x": [[1.0]]}}\n\n{"inputs": {"x": [[2.0]]}}\n')
    plan = release.make_plan(context(), "fly", "gs://b/v2.onnx#12", "", str(path), "", None, True, False)
    assert plan.samples == [{"inputs": {"x": [[1.0]]}}, {"inputs": {"x": [[2.0]]}}] and plan.pinned_id == "12"
    path.write_text("[1, 2]\n")
    with pytest.raises(Exit, match="line 1 has no \"inputs\": each line must be a /predict body"):
        release.load_samples(str(path))


def test_the_record_keeps_every_other_line_of_invoke_yaml(tmp_path):
    path = tmp_path / "invoke.yaml"
    path.write_text("# settings\nmodel:\n  uri: models/demo.onnx   # the model\n  # pinned below\n"
                    "  sha256: \"\"\ngcp:\n  project: p\n")
    release_journal.write_model(path, "gs://b/v2.onnx#12", "ab" * 32)
    text = path.read_text()
    assert yaml.safe_load(text) == {"model": {"uri": "gs://b/v2.onnx#12", "sha256": "ab" * 32},
                                    "gcp": {"project": "p"}}
    assert "# the model" in text and "# pinned below" in text and text.startswith("# settings")
    bare = tmp_path / "bare.yaml"
    bare.write_text("gcp:\n  project: p\n")
    release_journal.write_model(bare, "gs://b/v2.onnx#12", "")
    assert yaml.safe_load(bare.read_text())["model"] == {"uri": "gs://b/v2.onnx#12", "sha256": ""}


def test_figures_are_read_per_revision_from_cloud_monitoring(monitoring_stub):
    c = context(monitoring_endpoint=monitoring_stub.url)
    monitoring_stub.figures["cand"] = RevisionFigures({"2xx": 990, "4xx": 5, "5xx": 10}, 250.5)
    monitoring_stub.figures["idle"] = NO_TRAFFIC
    assert monitoring.read(c, "cand", 1000.0, 1300.0, "token") == Figures("cand", 1005, 10, 250.5)
    assert monitoring.read(c, "idle", 1000.0, 1300.0, "token") == Figures("idle", 0, 0, None)
    count, latency = monitoring_stub.queries[:2]
    assert count["aggregation.groupByFields"] == ["metric.labels.response_code_class"]
    assert count["aggregation.alignmentPeriod"] == ["300s"] and count["interval.endTime"] == ["1970-01-01T00:21:40Z"]
    assert latency["aggregation.perSeriesAligner"] == ["ALIGN_PERCENTILE_99"]
    assert 'resource.labels.service_name="onnx-serve"' in count["filter"][0]
    elsewhere = context(monitoring_endpoint=monitoring_stub.url)
    elsewhere.config.gcp.project = "other-project"  # the stand-in answers 403 there, as for a missing grant
    with pytest.raises(Exit, match="the deployer needs roles/monitoring.viewer on other-project"):
        monitoring.read(elsewhere, "cand", 0, 60, "token")


def test_status_reads_the_model_and_the_build_from_health(monkeypatch):
    monkeypatch.setitem(fake_service.HEALTH, "build", {"revision": "abc1234", "version": "1.2", "created": "x"})
    with fake_service.fake_service() as (url, _):
        found = release.health_of(url, smoke.Access())
    assert found == {"status": "ready", "uri": "gs://b/m.onnx", "generation": 1, "sha256": "ab" * 32,
                     "build": "abc1234"}
    assert "did not answer" in release.health_of("http://127.0.0.1:9", smoke.Access())["error"]


def test_the_status_table_has_one_row_per_revision(capsys):
    release.show([{"revision": "svc-00002-m1c", "tags": ["m-12"], "percent": 10, "image": "r/i@sha256:" + "a" * 64,
                   "health": {"uri": "gs://b/v2.onnx", "generation": 12, "sha256": "ab" * 32, "build": "abc1234"}},
                  {"revision": "svc-00001-abc", "tags": [], "percent": 90, "image": "r/i@sha256:" + "a" * 64,
                   "health": {"error": "no URL of its own: tag it to reach it"}}], False, "revision")
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["REVISION", "TRAFFIC", "IMAGE", "DIGEST", "MODEL", "GENERATION", "SHA256", "BUILD"]
    assert first.split() == ["svc-00002-m1c", "(m-12)", "10%", "sha256:aaaaaaaaaaaa", "gs://b/v2.onnx", "12",
                             "abababababab", "abc1234"]
    assert "no URL of its own" in second


def test_a_release_is_in_flight_only_while_its_own_process_runs_not_a_later_one_with_its_pid():
    runner = subprocess.Popen(["sleep", "60"])  # stands for the process running a release
    try:
        entry = {"host": socket.gethostname(), "pid": runner.pid,
                 "process": release_journal.process_identity(runner.pid)}  # what `begin` records  # fmt: skip
        assert entry["process"] and release_journal.in_flight(entry)
        reused = {**entry, "process": entry["process"].rsplit(":", 1)[0] + ":1"}  # same pid, another start
        assert not release_journal.in_flight(reused)
        older = {k: v for k, v in entry.items() if k != "process"}  # a journal from before the field: pid only
        assert release_journal.in_flight(older)
        assert not release_journal.in_flight({**entry, "host": "another-machine"})
    finally:
        runner.kill()
        runner.wait()
    assert not release_journal.in_flight(entry)  # it ended
