"""The smoke test against a real local service (gunicorn, emulator), and against a stand-in of the API where a
test needs behaviour the real service never shows (a wrong output shape, a token it demands)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.support.fake_service import fake_service
from tests.support.models import ROOT, linear_model
from tests.support.ports import free_port
from tests.support.server import run_service
from tests.support.storage_emulator import storage_emulator
from tests.toolkit.conftest import SERVICE_KEY
from toolkit import smoke

INVOKE = [sys.executable, "-m", "invoke"]


def quiet(_):
    pass


@pytest.mark.slow
def test_passes_once_the_model_loads_after_a_delay(tmp_path):
    port = free_port()
    store = tmp_path / "storage"
    # The object is stored first, so storage that comes up late has it from its first answer (an emulator started
    # empty could answer "no such object" before the upload, which is a failed load, not a late one).
    with storage_emulator(port, data_dir=store) as emulator:
        emulator.upload("late", "m.onnx", linear_model(tmp_path / "m.onnx"))
    seen = []
    with run_service("gs://late/m.onnx", tmp_path, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}") as service:
        service.wait_answering()  # a loaded machine can take longer than the 3 s to start gunicorn

        def storage_comes_up_late():
            time.sleep(3)
            with storage_emulator(port, data_dir=store):
                done.wait(60)

        done = threading.Event()
        threading.Thread(target=storage_comes_up_late, daemon=True).start()
        try:
            result = smoke.check(service.url, timeout=60, progress=seen.append)
        finally:
            done.set()
    assert result.ok, result.reason
    assert result.outputs == {"scores": [1, 3]}
    assert any(line.startswith("waiting: 503 loading") for line in seen)
    assert result.seconds >= 2.5


@pytest.mark.slow
def test_times_out_when_the_model_never_loads(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with run_service("gs://never/m.onnx", tmp_path, STORAGE_EMULATOR_HOST=dead) as service:
        service.wait_health(lambda body: body["step"] == "downloading", what="the download to begin")
        result = smoke.check(service.url, timeout=3, progress=quiet)
    assert not result.ok
    assert result.reason.startswith("timed out") and "503 loading (downloading)" in result.reason


@pytest.mark.slow
def test_reports_the_load_failure_reason(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"no model here")
    with run_service(str(bad), tmp_path) as service:
        result = smoke.check(service.url, timeout=30, progress=quiet)
    assert not result.ok
    assert result.reason.startswith("the model failed to load:") and "onnxruntime" in result.reason


def test_fails_on_a_wrong_prediction_shape():
    with fake_service(outputs={"scores": [[0.1, 0.9]]}) as (url, _):
        result = smoke.check(url, timeout=10, progress=quiet)
    assert not result.ok
    assert result.reason == "output 'scores' has shape [1, 2]; the model declares ['N', 3]"


def test_fails_on_a_missing_output_and_on_a_sha256_mismatch():
    with fake_service(outputs={}) as (url, _):
        assert "left out output 'scores'" in smoke.check(url, timeout=10, progress=quiet).reason
    with fake_service() as (url, _):
        result = smoke.check(url, timeout=10, expect_sha256="cd" * 32, progress=quiet)
        assert f"runs model sha256 {'ab' * 32}" in result.reason


def test_private_service_needs_the_token(tmp_path):
    with fake_service(token="s3cret") as (url, received):
        denied = smoke.check(url, timeout=2, progress=quiet)
        allowed = smoke.check(url, timeout=10, token="s3cret", progress=quiet)
    assert not denied.ok and "last: 403" in denied.reason
    assert allowed.ok
    assert received[-1]["path"] == "/predict"
    assert received[-1]["body"] == {"inputs": {"features": [[0.5, 0.5, 0.5, 0.5]]}}


@pytest.mark.slow
def test_invoke_smoke_exit_codes_and_json(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path) as service:
        passed = subprocess.run([*INVOKE, "smoke", "--url", service.url, "--json"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    assert passed.returncode == 0, passed.stderr
    report = json.loads(passed.stdout)
    assert report["ok"] is True and report["outputs"] == {"logits": [1, 3], "probabilities": [1, 3]}
    assert report["health"]["model_loaded"] is True
    assert report["request"] == {"inputs": {"features": [[0.5, 0.5, 0.5, 0.5]]}}

    failed = subprocess.run([*INVOKE, "smoke", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "FAIL" in failed.stdout and "timed out" in failed.stdout and "not answering" in failed.stdout


def test_download_progress_is_a_live_line_on_a_terminal_and_plain_lines_otherwise(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(smoke.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    plain = smoke.LoadProgress(lines.append, live=False, every=2.0)
    for done in (10_000_000, 30_000_000, 50_000_000):
        plain.update("downloading", done, 100_000_000)
    # The first figures at once, then one line per `every` seconds, each with bytes, percent, rate and elapsed.
    assert lines == [
        "downloading: 10.0 MB of 100.0 MB (10%) at 0.0 MB/s, 0s elapsed",
        "downloading: 50.0 MB of 100.0 MB (50%) at 20.0 MB/s, 2s elapsed",
    ]
    live = smoke.LoadProgress(lines.append, live=True)
    live.update("downloading", 1_000_000, 4_000_000)
    live.update("downloading", 3_000_000, 4_000_000)
    live.close()
    out = capsys.readouterr().out
    assert out.count("\r\x1b[2K") == 2 and out.endswith("(75%) at 2.0 MB/s, 2s elapsed\n"), repr(out)
    assert len(lines) == 2  # the live line went to the terminal only


@pytest.mark.slow
def test_the_json_verdict_carries_the_load_figures(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path) as service:
        result = smoke.check(service.url, timeout=60, progress=None)
    assert result.ok
    assert result.load["bytes"] == demo_model.stat().st_size
    assert result.load["seconds"] == result.health["load_seconds"] > 0
    assert result.load["bytes_per_second"] == round(result.load["bytes"] / result.load["seconds"])


def test_passes_on_a_string_input_model(tmp_path):
    from tests.support.zoo import string_pipeline

    with run_service(str(string_pipeline(tmp_path)), tmp_path) as service:
        result = smoke.check(service.url, timeout=60, progress=None)
    assert result.ok, result.reason
    assert result.request == {"inputs": {"city": [["a"]]}}
    assert result.outputs["output_label"] == [1]


def test_an_api_key_goes_in_authorization_alone_and_in_x_api_key_beside_a_platform_token(keyed):
    assert smoke.auth_headers("", "KEY") == {"Authorization": "Bearer KEY"}  # a Fly app
    assert smoke.auth_headers("ID-TOKEN", "KEY") == {"Authorization": "Bearer ID-TOKEN", "X-API-Key": "KEY"}  # Cloud Run
    assert smoke.check(keyed, timeout=30, api_key=SERVICE_KEY, progress=quiet).ok
    # Cloud Run with IAM: the identity token in Authorization (the platform's), the key beside it
    both = smoke.check(keyed, timeout=30, token="an-identity-token", api_key=SERVICE_KEY, progress=quiet)
    assert both.ok, both.reason
    missing = smoke.check(keyed, timeout=30, progress=quiet)
    assert not missing.ok and missing.reason.startswith("/metadata answered 401: the service needs an API key")
    wrong = smoke.check(keyed, timeout=30, api_key="not-the-key-0123456789", progress=quiet)
    assert wrong.reason == "/metadata answered 401: the API key sent is not one of the service's API_KEYS"


@pytest.mark.slow
def test_invoke_smoke_takes_the_key_from_the_flag_config_or_environment(keyed):
    import os

    def run(*args, **env):
        return subprocess.run([*INVOKE, "smoke", "--url", keyed, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})  # fmt: skip

    assert run().returncode == 1
    for passed in (run("--api-key", SERVICE_KEY), run(INVOKE_SMOKE_API_KEY=SERVICE_KEY),
                   run(ONNX_SERVE_API_KEY=SERVICE_KEY)):  # fmt: skip
        assert passed.returncode == 0 and "PASS" in passed.stdout, passed.stdout + passed.stderr
        assert SERVICE_KEY not in passed.stdout + passed.stderr


def test_every_task_reaches_the_service_the_same_way_from_the_settings(gcloud_stub, monkeypatch):
    import copy

    import pytest
    from invoke import Config, Context, Exit

    from toolkit.defaults import DEFAULTS

    settings = copy.deepcopy(DEFAULTS)
    settings["smoke"]["api_key"] = SERVICE_KEY
    settings["run"] = {"in_stream": False}  # no stdin to mirror under pytest
    c = Context(Config(overrides=settings))
    assert smoke.access(c, "fly").headers == {"Authorization": f"Bearer {SERVICE_KEY}"}
    c.config.cloudrun.public = True
    assert smoke.access(c, "cloudrun") == smoke.Access("", SERVICE_KEY)
    c.config.smoke.api_key = ""
    monkeypatch.setenv(smoke.API_KEY_VARIABLE, "from-the-environment")
    assert smoke.access(c, "cloudrun").api_key == "from-the-environment"
    # a private service: an identity token from gcloud, which the stand-in's token-file account cannot mint
    c.config.cloudrun.public = False
    with pytest.raises(Exit, match="`gcloud auth print-identity-token` failed: run `gcloud auth login` first"):
        smoke.access(c, "cloudrun")
