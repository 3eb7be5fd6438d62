"""`invoke release --target cloudrun` when something goes wrong inside it, with the real gcloud against the Cloud Run
stand-in and the Cloud Monitoring stand-in failing on demand: every failure and signal ends with all traffic on the
stable revision (or, when going back fails too, with the state and the command printed), and the journal says so.
`invoke status` and `invoke rollback` then read the journal."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time

import pytest
import yaml

from tests.support.models import ROOT
from tests.support.monitoring_stub import NO_TRAFFIC, RevisionFigures, monitoring_stub  # noqa: F401 (fixture)
from tests.support.processes import stop
from tests.support.waiting import wait_for
from tests.toolkit.conftest import SERVICE_KEY
from tests.toolkit.deploy_helpers import INVOKE, invoke
from tests.toolkit.test_deploy_cloudrun import SERVICE, serving
from tests.toolkit.test_release_cloudrun import (  # noqa: F401 (project: fixture)
    NEW_MODEL, OLD_MODEL, TAG, candidate_of, journal, project, release)

pytestmark = pytest.mark.slow  # each test runs one or more gcloud flows (a dozen gcloud calls each)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def percents(body) -> list[int]:
    """The traffic an update of the service asks for, e.g. [10, 90] for the first step."""
    return sorted(t["percent"] for t in body["spec"].get("traffic", []) if t.get("percent"))


@pytest.mark.parametrize("fault, words", [
    ("403", "Cloud Monitoring refused to read figures (403): the deployer needs roles/monitoring.viewer"),
    ("500", "Cloud Monitoring answered 500"),
    ("timeout", "Cloud Monitoring did not answer (ReadTimeout after up to 1s, release.monitoring_timeout)"),
    ("token", "no credentials to read Cloud Monitoring from GOOGLE_APPLICATION_CREDENTIALS: File "),
])
def test_a_monitoring_failure_inside_a_step_sends_all_traffic_back_to_the_stable_revision(
        gcloud_stub, monitoring_stub, project, monkeypatch, tmp_path, fault, words):
    config, record, stable = project
    if fault == "timeout":
        monitoring_stub.hang(5)
    elif fault == "token":  # google-auth reads a key file named by GOOGLE_APPLICATION_CREDENTIALS (CI's way)
        missing = tmp_path / "no-such-key.json"
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    else:
        monitoring_stub.refuse(int(fault))
    result = release(config, release_monitoring_timeout="1")
    assert result.returncode == 1
    candidate = candidate_of(gcloud_stub)
    assert serving(gcloud_stub) == {stable: 100}
    assert last_line(result).startswith(f"release stopped, traffic 100% on {stable}: ") and words in last_line(result)
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and words in last["events"][-1]["detail"]
    assert last["stable"]["revision"] == stable and last["candidate"] == candidate
    assert [e["state"] for e in last["events"]] == ["started", "deploying", "deployed", "step", "failed",
                                                    "rolled_back"]
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL


def test_a_refused_update_traffic_leaves_the_stable_revision_serving(gcloud_stub, monitoring_stub, project):
    config, record, stable = project
    gcloud_stub.fail_next(403, "Permission 'run.services.update' denied on resource", method="PUT",
                          body=lambda body: percents(body) == [10, 90])
    result = release(config)
    assert result.returncode == 1
    assert serving(gcloud_stub) == {stable: 100}
    line = last_line(result)
    assert line.startswith(f"release stopped, traffic 100% on {stable}: `gcloud run services update-traffic")
    assert "Permission 'run.services.update' denied" in line
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and "update-traffic" in last["events"][-1]["detail"]


def test_when_going_back_fails_too_the_state_and_the_command_are_printed_and_rollback_finishes_it(
        gcloud_stub, monitoring_stub, project):
    config, record, stable = project

    refused = []

    def second_step(body) -> bool:
        refused.append(percents(body) == [50, 50])
        return refused[-1]

    gcloud_stub.fail_next(403, "Permission 'run.services.update' denied", method="PUT", body=second_step)
    # then the way back (all to one revision, after the refused step) is refused too
    gcloud_stub.fail_next(400, "Revision traffic cannot be changed now", method="PUT",
                          body=lambda body: any(refused) and percents(body) == [100])
    result = release(config)
    assert result.returncode == 1
    candidate = candidate_of(gcloud_stub)
    assert serving(gcloud_stub) == {stable: 90, candidate: 10}  # stuck between the two, and said so
    assert f"the platform now: service {SERVICE} sends {stable} 90%, {candidate} 10%" in result.stdout
    command = (f"gcloud run services update-traffic {SERVICE} --project stub-project --region us-central1 "
               f"--to-revisions {stable}=100 --quiet")
    assert "going back failed too:" in result.stderr and f"finish it with:\n  {command}\n" in result.stderr
    last = journal(record)[-1]
    assert last["state"] == "rollback_failed" and "Revision traffic cannot be changed now" in (
        last["events"][-1]["detail"])

    status = invoke("-f", str(record), "status", "--target", "cloudrun", **config)
    assert status.returncode == 0, status.stderr
    assert f"release of {NEW_MODEL}" in status.stdout and "interrupted at rollback_failed" in status.stdout
    assert f"finish it: `invoke rollback --target cloudrun` (100% back to {stable})" in status.stdout

    back = invoke("-f", str(record), "rollback", "--target", "cloudrun", **config)
    assert back.returncode == 0, back.stdout + back.stderr
    assert serving(gcloud_stub) == {stable: 100}
    assert journal(record)[-1]["state"] == "rolled_back"
    assert "interrupted" not in invoke("-f", str(record), "status", "--target", "cloudrun", **config).stdout


def test_hold_then_rollback_after_an_earlier_rejected_release_goes_to_the_journals_stable_revision(
        gcloud_stub, monitoring_stub, project, healthy):
    config, record, stable = project
    monitoring_stub.figures[stable] = RevisionFigures({"2xx": 5000}, 120.0)
    monitoring_stub.default = RevisionFigures({"2xx": 900, "5xx": 100}, 120.0)  # the first candidate: rejected
    rejected = release(config)
    assert rejected.returncode == 1 and serving(gcloud_stub) == {stable: 100}
    first = candidate_of(gcloud_stub)  # it keeps its tag and stays Ready: the platform's order names it next

    other, other_tag = "gs://my-models/demo-v3.onnx#1700000000000003", "m-1700000000000003"
    gcloud_stub.state.urls[other_tag] = healthy
    monitoring_stub.default = NO_TRAFFIC
    held = invoke("-f", config["release_record"], "release", "--target", "cloudrun", "--model", other,
                  "--skip-compare", **config)
    assert held.returncode == 1 and "release held at 10%" in last_line(held)
    second = candidate_of(gcloud_stub, other_tag)
    assert serving(gcloud_stub) == {stable: 90, second: 10}
    assert journal(record)[-1]["state"] == "held" and journal(record)[-2]["state"] == "rolled_back"

    status = invoke("-f", str(record), "status", "--target", "cloudrun", **config)
    assert f"release of {other}" in status.stdout and ": held" in status.stdout
    assert (f"finish it: `invoke rollback --target cloudrun` (100% back to {stable}), or `invoke release --target "
            f"cloudrun --model '{other}'` to judge it again") in status.stdout

    back = invoke("-f", str(record), "rollback", "--target", "cloudrun", **config)
    assert back.returncode == 0, back.stdout + back.stderr
    assert serving(gcloud_stub) == {stable: 100} and first != stable  # not the rejected candidate
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and last["model"]["uri"] == other
    assert f"traffic: 100% to {stable}" in last["events"][-1]["detail"]


def test_api_keys_on_the_service_the_release_sends_the_key_everywhere(gcloud_stub, monitoring_stub, project, keyed,
                                                                     tmp_path):
    config, record, stable = project
    gcloud_stub.state.urls[None] = keyed
    gcloud_stub.state.urls[TAG] = keyed
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"inputs": {"features": [[0.1, 0.2, 0.3, 0.4]]}}\n')
    without = release(config, "--samples", str(samples))
    assert without.returncode == 1 and "the service needs an API key" in last_line(without)
    assert serving(gcloud_stub) == {stable: 100} and journal(record)[-1]["state"] == "rolled_back"

    result = release(config, "--samples", str(samples), smoke_api_key=SERVICE_KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    candidate = candidate_of(gcloud_stub)
    assert serving(gcloud_stub) == {candidate: 100}
    assert journal(record)[-1]["state"] == "promoted"
    status = invoke("-f", str(record), "status", "--target", "cloudrun", "--json", **config,
                    smoke_api_key=SERVICE_KEY)
    assert '"status": "ready"' in status.stdout


def start_release(config: dict, log_dir, step_wait: str = "60") -> subprocess.Popen:
    env = {**os.environ, **{f"INVOKE_{k.upper()}": v for k, v in {**config, "release_step_wait": step_wait}.items()}}
    with open(log_dir / "out.txt", "wb") as out, open(log_dir / "err.txt", "wb") as err:
        return subprocess.Popen([*INVOKE, "-f", config["release_record"], "release", "--target", "cloudrun",
                                 "--model", NEW_MODEL, "--skip-compare"], cwd=ROOT, env=env, stdout=out, stderr=err,
                                start_new_session=True)


ROUNDS = 10


@pytest.mark.parametrize("name, number", [("SIGINT", n) for n in range(ROUNDS)] + [("SIGTERM", 0), ("SIGTERM", 1)]
                         + [("SIGINT twice", n) for n in range(6)])
def test_a_signal_during_a_step_sends_all_traffic_back_and_is_journaled(gcloud_stub, monitoring_stub, project,
                                                                        tmp_path, name, number):
    config, record, stable = project
    process = start_release(config, tmp_path)
    rng = random.Random(number)
    try:
        # the candidate takes 10%: the release is in its step (the update may still be finishing: so may Ctrl-C)
        wait_for(lambda: process.poll() is not None or sorted(serving(gcloud_stub).values()) == [10, 90],
                 timeout=120, what="the first step")
        assert process.poll() is None, (tmp_path / "err.txt").read_text()
        time.sleep(rng.uniform(0, 1.5))
        if name == "SIGINT twice":  # Ctrl-C at a terminal, twice: to the whole group, the second while going back
            os.killpg(process.pid, signal.SIGINT)
            time.sleep(rng.uniform(0.1, 1.5))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            name = "SIGINT"
        else:
            os.kill(process.pid, getattr(signal, name))
        code = process.wait(120)
    finally:
        stop(process)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == {"SIGINT": 130, "SIGTERM": 143}[name], out + err
    assert serving(gcloud_stub) == {stable: 100}
    assert err.strip().splitlines()[-1] == f"release stopped, traffic 100% on {stable}: interrupted by {name}", err
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and last["events"][-1]["detail"].endswith(f"interrupted by {name}")
    assert [e["state"] for e in last["events"]][-3:] == ["step", "failed", "rolled_back"]
