"""`invoke tune` end to end: the project's image (built on the stand-in base) in a real Docker engine, under a
Cloud Run and a Fly shape, with two real models of very different cost: the demo model (microseconds a row, and
batches) and a heavy fixed-shape one (two 1024x1024 matrix products a request, batch dimension fixed to 1).

Steps are short here (1.5 s after 0.5 s of warm-up) to keep the module within a few minutes; the figures are noisy
on a shared machine, so the checks are about what a user decides with them, with wide margins."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import tomllib

import pytest
import yaml

from tests.image.conftest import base_image, docker, figures, project_image  # noqa: F401  (session fixtures)
from tests.image.tasks_cli import INVOKE, run_invoke
from tests.support.models import DEMO_MODEL, ROOT, slow_model
from toolkit.tune import LABEL

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.xdist_group("docker")]  # one engine

SHAPE = "1:2Gi"
FAST = ["--step-seconds", "1.5", "--warmup-seconds", "0.5"]
P99_MS = 250


def tune(engine, image, out, *args, env=None, **config) -> dict:
    done = run_invoke("tune", "--image", image, "--json", "--out", str(out), "--p99-ms", str(P99_MS), *FAST, *args,
                      engine=engine, env=env, timeout=600, **config)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout)


def leftovers(engine) -> list[str]:
    return engine.docker("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}").stdout.split()


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("heavy") / "heavy.onnx", size=1024, rounds=2)


@pytest.fixture(scope="module")
def sweeps(docker, project_image, heavy, tmp_path_factory):
    """One Cloud Run sweep of each model on one shape; the demo run also writes a copy of invoke.yaml and a plot."""
    folder = tmp_path_factory.mktemp("sweeps")
    record = folder / "invoke.yaml"
    record.write_text((ROOT / "invoke.yaml").read_text())
    demo = tune(docker, project_image, folder / "demo.json", "--shapes", SHAPE, "--write", "--plot",
                str(folder / "demo.svg"), TUNE_RECORD=str(record))  # fmt: skip
    heavy_run = tune(docker, project_image, folder / "heavy.json", "--shapes", SHAPE, "--model", str(heavy))
    return {"demo": demo, "heavy": heavy_run, "folder": folder, "record": record}


def test_the_recommended_concurrency_differs_by_a_large_factor_between_the_models(sweeps, docker):
    demo, heavy = (sweeps[name]["shapes"][0]["recommended"] for name in ("demo", "heavy"))
    print(f"\ndemo: {demo}\nheavy: {heavy}")
    assert demo["concurrency"] >= 4 * heavy["concurrency"], (demo, heavy)
    assert demo["rps"] >= 20 * heavy["rps"], (demo, heavy)
    assert leftovers(docker) == []


@pytest.mark.parametrize("model", ["demo", "heavy"])
def test_each_recommended_point_holds_when_measured_again_alone(sweeps, model, docker, project_image, heavy, tmp_path):
    point = sweeps[model]["shapes"][0]["recommended"]
    args = ["--model", str(heavy)] if model == "heavy" else []
    again = tune(docker, project_image, tmp_path / "again.json", "--shapes", SHAPE, "--levels",
                 str(point["concurrency"]), *args)  # fmt: skip
    (step,) = again["shapes"][0]["steps"]
    print(f"\n{model}: sweep {point}, alone {step}")
    assert step["errors"] == 0 and step["p99_ms"] <= P99_MS
    assert step["rps"] >= 0.5 * point["rps"], (point, step)  # a shared, busy machine: half is the floor


def test_the_document_has_what_the_issue_lists(sweeps):
    document = sweeps["demo"]
    assert document["target"] == "cloudrun" and document["slo"] == {"p99_ms": P99_MS}
    assert document["prices"]["cloudrun"]["source"].startswith("https://cloud.google.com/run/pricing")
    assert document["prices"]["cloudrun"]["as_of"] and document["prices"]["fly"]["as_of"]
    (shape,) = document["shapes"]
    assert (shape["cpu"], shape["memory"]) == (1, "2Gi")
    for step in shape["steps"]:
        assert set(step) >= {"concurrency", "rps", "p50_ms", "p99_ms", "errors", "cpu_util", "peak_rss_bytes"}
        assert step["peak_rss_bytes"] > 10 * 2**20 and 0 < step["cpu_util"] <= 1.5
    assert [s["concurrency"] for s in shape["steps"]][:3] == [1, 2, 4]
    assert set(shape["recommended"]) >= {"concurrency", "rps", "p99_ms"}
    assert shape["usd_per_million"] == shape["by_billing"]["request_tier1"] > 0.4  # the request fee is in it
    assert shape["cheaper_billing"] in ("request", "instance")
    assert document["choice"]["shape"] == SHAPE


def test_write_put_the_choice_into_the_cloudrun_keys_only(sweeps):
    document, record = sweeps["demo"], sweeps["record"]
    before, after = yaml.safe_load((ROOT / "invoke.yaml").read_text()), yaml.safe_load(record.read_text())
    settings = document["choice"]["settings"]
    assert after.pop("cloudrun") == {"cpu": "1", "memory": settings["memory"], "concurrency": settings["concurrency"]}
    assert after == before
    assert f"model sha256 {document['run']['model_sha256'][:16]}" in record.read_text()
    assert (sweeps["folder"] / "demo.svg").read_text().lstrip().startswith("<?xml")


def test_fly_sizes_at_the_shared_baseline_and_writes_fly_toml(docker, project_image, tmp_path):
    config = tmp_path / "fly.toml"
    config.write_text((ROOT / "fly.toml").read_text())
    document = tune(docker, project_image, tmp_path / "fly.json", "--target", "fly", "--shapes",
                    "shared-cpu-1x:1gb,performance-1x:2gb", "--levels", "1,4", "--write", "--plot",
                    FLY_CONFIG=str(config))  # fmt: skip
    shared, performance = document["shapes"]
    assert shared["quota_cpus"] == 0.0625 and "baseline" in shared["burst"]
    # the quota is in force: at 4 in flight the service uses all of its 1/16 CPU, and serves less than on a whole one
    # (the ratio itself swings with the neighbours on a shared machine, so it is not held to 16)
    assert shared["steps"][-1]["cpu_util"] >= 0.8, shared
    assert shared["recommended"]["rps"] < performance["recommended"]["rps"], (shared, performance)
    written = tomllib.loads(config.read_text())
    settings = document["choice"]["settings"]
    assert written["vm"] == [{"size": settings["size"], "memory": settings["memory"]}]
    assert (written["http_service"]["concurrency"]["soft_limit"], written["http_service"]["concurrency"]["hard_limit"]) \
        == (settings["soft_limit"], settings["hard_limit"])
    assert (tmp_path / "fly.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --plot without a path: beside the JSON


def test_bad_input_fails_with_the_fix_and_leaves_no_container(docker, project_image, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"inputs": {"nope": [[1.0]]}}) + "\n")
    cases = [
        (["--image", project_image, "--model", str(corrupt)], "model.compare"),
        (["--image", project_image, "--samples", str(wrong)], "give --samples with /predict bodies this model takes"),
        (["--image", "onnx-serve:no-such-tag"], "invoke image.build"),
    ]
    for args, expected in cases:
        done = run_invoke("tune", "--shapes", SHAPE, "--out", str(tmp_path / "t.json"), *args, engine=docker,
                          timeout=300)  # fmt: skip
        text = done.stdout + done.stderr
        assert done.returncode != 0 and expected in text and "Traceback" not in text, text
    assert leftovers(docker) == []


@pytest.mark.parametrize("after", [0.0, 2.0, 8.0], ids=["starting", "loading", "sweeping"])
def test_ctrl_c_removes_the_container(docker, project_image, heavy, tmp_path, after):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}, "DOCKER_HOST": docker.host}
    command = [*INVOKE, "tune", "--image", project_image, "--model", str(heavy), "--shapes", SHAPE, "--levels",
               "1,1,1", "--step-seconds", "60", "--out", str(tmp_path / "t.json")]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        running: list[str] = []
        while time.monotonic() < deadline:
            running = docker.docker("ps", "--filter", f"label={LABEL}", "--format", "{{.Names}}").stdout.split()
            if running:
                break
            time.sleep(0.5)
        assert running, "tune never started its container"
        time.sleep(after)  # as the container starts, while the model loads, during a step of the sweep
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert "interrupted" in stdout + stderr and "Traceback" not in stdout + stderr, stdout + stderr
    assert leftovers(docker) == []


def test_a_gs_model_is_downloaded_once_and_mounted(docker, project_image, emulator, tmp_path):
    """A gs:// model (in the storage emulator) is fetched once by the toolkit's download and mounted read-only: the
    container is given the mounted file as MODEL_URI and no storage settings, and the run reports the object's
    sha256."""
    emulator.upload("tune-models", "demo/model.onnx", DEMO_MODEL)
    document = tune(docker, project_image, tmp_path / "gs.json", "--model", "gs://tune-models/demo/model.onnx",
                    "--shapes", SHAPE, "--levels", "2", env=emulator.env)  # fmt: skip
    assert document["run"]["model_sha256"] == hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()
    assert document["shapes"][0]["steps"][0]["rps"] > 0
    assert leftovers(docker) == []
