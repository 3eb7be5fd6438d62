"""`invoke release --target fly`, `invoke status --target fly` and `invoke rollback` after a release, against the
flyctl contract stand-in; the smoke test reaches real services on loopback through fly.url."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
import yaml

from tests.support import variants
from tests.support.models import DEMO_MODEL, ROOT
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.waiting import wait_for
from tests.toolkit.deploy_helpers import INVOKE, invoke
from tests.toolkit.conftest import SERVICE_KEY
from tests.toolkit.test_deploy_fly import APP, CONFIG, KEYLESS_ENV, OLD_IMAGE, deploys

KEYLESS = dict(pair.split("=", 1) for pair in KEYLESS_ENV[1::2])

OLD_MODEL = "gs://my-models/demo.onnx#1700000000000001"
NEW_MODEL = "gs://my-models/demo-v2.onnx#1700000000000002"


# what the Machines run before a release (fly.toml's [env] too): the model, its sha256, settings a release keeps
SERVING_ENV = {"PORT": "8080", "WEB_CONCURRENCY": "1", "MODEL_URI": OLD_MODEL, "MODEL_SHA256": "ab" * 32,
               "LOG_LEVEL": "debug", "MAX_BATCH_SIZE": "8"}


def journal(record) -> list[dict]:
    return json.loads(record.with_name(record.stem + ".releases.json").read_text())


@pytest.fixture
def project(fake_flyctl, tmp_path):
    fake_flyctl.add_app(APP, image=OLD_IMAGE, env=SERVING_ENV)
    record = tmp_path / "invoke.yaml"
    record.write_text(f"model:\n  uri: {OLD_MODEL}\n")
    config = {k: v for k, v in CONFIG.items() if k != "model_uri"}
    return dict(config, release_record=str(record)), record


def release(config, url, *flags):
    return invoke("-f", config["release_record"], "release", "--target", "fly", "--model", NEW_MODEL,
                  "--skip-compare", *flags, **config, fly_url=url)


def machine_env(fake) -> list[dict]:
    return [m["config"]["env"] for m in fake.app(APP)["machines"]]


@pytest.mark.slow
def test_release_redeploys_the_serving_image_blue_green_with_only_the_model_changed(fake_flyctl, project, healthy):
    config, record = project
    result = release(config, healthy)
    assert result.returncode == 0, result.stdout + result.stderr
    (deploy,) = deploys(fake_flyctl)
    assert deploy[deploy.index("--image") + 1] == OLD_IMAGE  # the image that serves: nothing built
    assert "--remote-only" not in deploy
    assert deploy[deploy.index("--strategy") + 1] == "bluegreen"
    assert f"MODEL_URI={NEW_MODEL}" in deploy
    settings = {name: value for name, value in SERVING_ENV.items() if name != "MODEL_SHA256"}  # the new has none
    assert all(env == {**settings, "MODEL_URI": NEW_MODEL, **KEYLESS} for env in machine_env(fake_flyctl))
    assert not any(arg.startswith("MODEL_SHA256=") for arg in deploy)  # the old model's sha256 is not sent
    assert yaml.safe_load(record.read_text())["model"]["uri"] == NEW_MODEL
    assert journal(record)[-1]["state"] == "promoted" and journal(record)[-1]["stable"]["env"] == SERVING_ENV

    status = invoke("-f", str(record), "status", "--target", "fly", "--json", **config, fly_url=healthy)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert len(rows) == 2 and {r["share"] for r in rows} == {"1/2"}
    assert all(r["health"]["status"] == "ready" and r["image"].startswith(f"registry.fly.io/{APP}@sha256:")
               for r in rows)

    back = invoke("-f", str(record), "rollback", "--target", "fly", **config)
    assert back.returncode == 0, back.stdout + back.stderr
    last = deploys(fake_flyctl)[-1]
    assert last[last.index("--image") + 1] == OLD_IMAGE and f"MODEL_URI={OLD_MODEL}" in last
    assert all(env == SERVING_ENV for env in machine_env(fake_flyctl))  # the model, its sha256 and the settings
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL
    assert journal(record)[-1]["state"] == "rolled_back"


@pytest.mark.slow
def test_a_failed_smoke_test_brings_the_previous_image_env_and_secrets_back(fake_flyctl, project, broken):
    config, record = project
    fake_flyctl.run("secrets", "set", "API_KEYS=-", "--app", APP, input="key-one", check=True)
    secrets_before = fake_flyctl.app(APP)["secrets"]
    result = release(config, broken)
    assert result.returncode == 1
    forward, back = deploys(fake_flyctl)
    assert f"MODEL_URI={NEW_MODEL}" in forward
    assert back[back.index("--image") + 1] == OLD_IMAGE and back[back.index("--strategy") + 1] == "immediate"
    assert all(env == SERVING_ENV for env in machine_env(fake_flyctl))  # exactly the env from before, settings too
    assert fake_flyctl.app(APP)["secrets"] == secrets_before
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"release rolled back, {OLD_MODEL} serves again on {OLD_IMAGE}: smoke test failed")
    assert "the model failed to load" in line
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and last["events"][-1]["detail"] == line


def test_api_keys_on_the_app_the_release_sends_the_key(fake_flyctl, project, keyed):
    config, record = project
    without = release(config, keyed)
    assert without.returncode == 1 and "the service needs an API key" in without.stderr
    assert all(env == SERVING_ENV for env in machine_env(fake_flyctl)) and journal(record)[-1]["state"] == "rolled_back"
    result = invoke("-f", config["release_record"], "release", "--target", "fly", "--model", NEW_MODEL,
                    "--skip-compare", **config, fly_url=keyed, smoke_api_key=SERVICE_KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(env["MODEL_URI"] == NEW_MODEL for env in machine_env(fake_flyctl))
    assert journal(record)[-1]["state"] == "promoted"


def test_a_failed_blue_green_deploy_changes_nothing_more(fake_flyctl, project, healthy, monkeypatch):
    config, record = project
    monkeypatch.setenv("FAKE_FLY_DEPLOY_FAIL", "smoke checks for 0e286039f42e86 failed: the app crashed")
    result = release(config, healthy)
    assert result.returncode == 1
    assert len(deploys(fake_flyctl)) == 1  # no second deploy: the blue Machines kept serving
    assert all(env["MODEL_URI"] == OLD_MODEL for env in machine_env(fake_flyctl))
    line = result.stderr.strip().splitlines()[-1]
    assert "the blue-green deploy failed, the previous Machines keep serving" in line and "the app crashed)" in line
    assert journal(record)[-1]["state"] == "rolled_back"


@pytest.mark.slow
def test_the_compare_gate_runs_against_the_model_the_machines_serve(fake_flyctl, tmp_path, healthy, emulator,
                                                                    monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    serving = f"gs://fly-models/demo.onnx#{emulator.upload('fly-models', 'demo.onnx', DEMO_MODEL)}"
    changed = variants.output_as_double(DEMO_MODEL, tmp_path / "double.onnx", "probabilities")
    candidate = f"gs://fly-models/double.onnx#{emulator.upload('fly-models', 'double.onnx', changed)}"
    fake_flyctl.add_app(APP, image=OLD_IMAGE, env={"MODEL_URI": serving})
    record = tmp_path / "invoke.yaml"
    record.write_text(f"model:\n  uri: {serving}\n")
    config = {k: v for k, v in CONFIG.items() if k != "model_uri"}
    result = invoke("-f", str(record), "release", "--target", "fly", "--model", candidate, **config,
                    release_record=str(record), fly_url=healthy)
    assert result.returncode == 1
    assert f"against the serving {serving}" in result.stdout
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("release stopped before any change: the candidate fails the compare: breaking")
    assert "probabilities" in line and "float64" in line and deploys(fake_flyctl) == []


def test_dry_run_prints_the_deploy_and_the_way_back_and_runs_no_flyctl(fake_flyctl, project):
    config, record = project
    result = invoke("-f", str(record), "release", "--target", "fly", "--model", NEW_MODEL, "--dry-run", **config)
    assert result.returncode == 0, result.stderr
    assert "# invoke model.compare --candidate " + NEW_MODEL in result.stdout
    deploy = f"deploy --app {APP} --config fly.toml --image SERVING_IMAGE --strategy bluegreen --wait-timeout 10m"
    assert deploy + " --env " in result.stdout
    assert "--strategy bluegreen" in result.stdout and "--strategy immediate" in result.stdout
    assert fake_flyctl.argvs() == [] and NEW_MODEL not in record.read_text()


def start_release(config: dict, url: str, log_dir) -> subprocess.Popen:
    env = {**os.environ, **{f"INVOKE_{k.upper()}": v for k, v in {**config, "fly_url": url}.items()}}
    with open(log_dir / "out.txt", "wb") as out, open(log_dir / "err.txt", "wb") as err:
        return subprocess.Popen([*INVOKE, "-f", config["release_record"], "release", "--target", "fly", "--model",
                                 NEW_MODEL, "--skip-compare"], cwd=ROOT, env=env, stdout=out, stderr=err,
                                start_new_session=True)


def in_smoke_test(fake, process) -> bool:
    """The new model is on every Machine and the smoke test waits for an app that does not answer."""
    return process.poll() is not None or all(env["MODEL_URI"] == NEW_MODEL for env in machine_env(fake))


@pytest.mark.slow
@pytest.mark.parametrize("number", range(5))
def test_sigterm_during_the_smoke_test_brings_the_previous_env_back(fake_flyctl, project, tmp_path, number):
    config, record = project
    process = start_release(config, f"http://127.0.0.1:{free_port()}", tmp_path)  # nothing listens: it waits
    try:
        wait_for(lambda: in_smoke_test(fake_flyctl, process), timeout=60, what="the blue-green deploy")
        time.sleep(random.Random(number).uniform(0, 1.5))
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(60)
    finally:
        stop(process)
    err = (tmp_path / "err.txt").read_text()
    assert code == 143, err
    assert all(env == SERVING_ENV for env in machine_env(fake_flyctl))
    assert err.strip().splitlines()[-1] == (f"release rolled back, {OLD_MODEL} serves again on {OLD_IMAGE}: "
                                            "interrupted by SIGTERM")
    assert journal(record)[-1]["state"] == "rolled_back"


def test_a_killed_release_is_shown_as_interrupted_and_rollback_finishes_it(fake_flyctl, project, tmp_path):
    config, record = project
    process = start_release(config, f"http://127.0.0.1:{free_port()}", tmp_path)
    try:
        wait_for(lambda: in_smoke_test(fake_flyctl, process), timeout=60, what="the blue-green deploy")
        wait_for(lambda: journal(record)[-1]["state"] == "deployed", timeout=30, what="the journal's deployed")
        os.killpg(process.pid, signal.SIGKILL)  # nothing can catch this one: the journal is all that is left
        process.wait(30)
    finally:
        stop(process)
    assert all(env["MODEL_URI"] == NEW_MODEL for env in machine_env(fake_flyctl))
    status = invoke("-f", str(record), "status", "--target", "fly", **config, fly_url="http://127.0.0.1:9")
    assert status.returncode == 0, status.stderr
    assert f"release of {NEW_MODEL}" in status.stdout and "interrupted at deployed" in status.stdout
    assert f"finish it: `invoke rollback --target fly` ({OLD_IMAGE} with {OLD_MODEL} again)" in status.stdout

    back = invoke("-f", str(record), "rollback", "--target", "fly", **config)
    assert back.returncode == 0, back.stdout + back.stderr
    assert all(env == SERVING_ENV for env in machine_env(fake_flyctl))
    last = journal(record)[-1]
    assert last["state"] == "rolled_back" and last["events"][-1]["detail"].startswith(f"redeployed {OLD_IMAGE}")
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL  # never promoted: nothing to rewrite


@pytest.mark.slow
def test_when_going_back_fails_too_the_state_and_the_command_are_printed_and_rollback_finishes_it(
        fake_flyctl, project, broken, monkeypatch):
    config, record = project
    monkeypatch.setenv("FAKE_FLY_DEPLOY_FAIL_STRATEGY", "immediate")  # the way back's deploy is refused
    result = release(config, broken)
    assert result.returncode == 1
    assert len(deploys(fake_flyctl)) == 2  # forward, then the refused way back
    assert all(env["MODEL_URI"] == NEW_MODEL for env in machine_env(fake_flyctl))  # stuck on the candidate
    assert "smoke test failed" in result.stderr and "going back failed too:" in result.stderr
    assert "failed to update machine 0e286039f42e86" in result.stderr
    assert "finish it with:\n  " in result.stderr and f"--image {OLD_IMAGE}" in result.stderr
    last = journal(record)[-1]
    assert last["state"] == "rollback_failed" and "failed to update machine" in last["events"][-1]["detail"]

    monkeypatch.delenv("FAKE_FLY_DEPLOY_FAIL_STRATEGY")  # the platform answers again
    status = invoke("-f", str(record), "status", "--target", "fly", **config, fly_url="http://127.0.0.1:9")
    assert status.returncode == 0, status.stderr
    assert "interrupted at rollback_failed" in status.stdout
    assert f"finish it: `invoke rollback --target fly` ({OLD_IMAGE} with {OLD_MODEL} again)" in status.stdout
    back = invoke("-f", str(record), "rollback", "--target", "fly", **config)
    assert back.returncode == 0, back.stdout + back.stderr
    assert all(env == SERVING_ENV for env in machine_env(fake_flyctl))
    assert journal(record)[-1]["state"] == "rolled_back"
    assert yaml.safe_load(record.read_text())["model"]["uri"] == OLD_MODEL
