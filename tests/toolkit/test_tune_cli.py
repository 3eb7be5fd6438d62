"""`invoke tune` from the command line where no container is needed: bad input fails fast with the fix named, and
`--url` measures a real service (gunicorn on loopback, behind an API key) with its key."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.image.tasks_cli import run_invoke
from tests.support.external import missing_tool
from tests.support.ports import free_port
from tests.toolkit.conftest import SERVICE_KEY

NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def refused(done, *fragments: str) -> None:
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--shapes", "3:4Gi"], "Cloud Run offers 1, 2, 4, 6 or 8 vCPU"),
        (["--shapes", "1:16Gi"], "with 1 vCPU Cloud Run allows 512Mi to 4Gi"),
        (["--target", "fly", "--shapes", "shared-cpu-3x:1gb"], "is not a Fly VM size; use one of shared-cpu-1x"),
        (["--target", "heroku"], "tune sizes for cloudrun or fly"),
        (["--p99-ms", "0"], "--p99-ms is '0': give a number above 0"),
        (["--levels", "1,x"], "give concurrencies as whole numbers"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(args, expected):
    refused(run_invoke("tune", *args, env=NO_ENGINE), expected)


def test_without_a_docker_engine_the_fix_is_named():
    refused(run_invoke("tune", "--shapes", "1:2Gi", env=NO_ENGINE, TUNE_RUNTIME="docker"), "no Docker engine answers",
            "--url")


def cgroups_left() -> list[str]:
    return [str(p) for p in Path("/sys/fs/cgroup").glob("**/onnx-serve-tune-*") if p.is_dir()]


@pytest.mark.slow
def test_without_docker_root_runs_the_service_in_a_cgroup_per_shape(tmp_path):
    if os.geteuid() != 0:
        missing_tool("limiting the service with a cgroup needs root")
    done = run_invoke("tune", "--shapes", "1:2Gi", "--levels", "1,8", "--step-seconds", "1.5", "--warmup-seconds", "0.5",
                      "--json", "--out", str(tmp_path / "t.json"), env=NO_ENGINE, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert "cgroup" in document["run"]["where"] and document["run"]["unconfined"] is False
    for step in document["shapes"][0]["steps"]:
        assert step["rps"] > 0 and step["errors"] == 0
        # figures from the service's own cgroup: at most the shape's one CPU, a working set of a few tens of MiB
        assert 0 < step["cpu_util"] <= 1.2 and 20 * 2**20 < step["peak_rss_bytes"] < 2**30
    assert cgroups_left() == []


@pytest.mark.slow
def test_unconfined_figures_say_so_on_every_line(tmp_path):
    done = run_invoke("tune", "--shapes", "1:2Gi", "--levels", "1,4", "--step-seconds", "1", "--warmup-seconds", "0.3",
                      "--unconfined", "--out", str(tmp_path / "t.json"), env=NO_ENGINE, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines()
            if re.search(r"\bc=\d", line) or re.match(r"\s+\d+\s+\d+\.\d\s", line)]  # fmt: skip
    assert len(rows) == 4, done.stdout  # two progress lines, two table rows
    assert all("this machine as it is" in row for row in rows), rows
    assert json.loads((tmp_path / "t.json").read_text())["run"]["unconfined"] is True


def test_a_url_that_does_not_answer_fails_with_the_fix(tmp_path):
    done = run_invoke("tune", "--url", f"http://127.0.0.1:{free_port()}", "--shapes", "1:2Gi",
                      "--out", str(tmp_path / "t.json"), timeout=120)  # fmt: skip
    refused(done, "is not serving", "check the URL")


def test_url_without_the_api_key_names_the_key(keyed, tmp_path):
    done = run_invoke("tune", "--url", keyed, "--shapes", "1:2Gi", "--out", str(tmp_path / "t.json"),
                      env={"ONNX_SERVE_API_KEY": ""})  # fmt: skip
    refused(done, "API key")


def test_url_measures_the_deployed_service_with_its_key(keyed, tmp_path):
    done = run_invoke("tune", "--url", keyed, "--api-key", SERVICE_KEY, "--shapes", "1:2Gi", "--levels", "1,4",
                      "--step-seconds", "1", "--warmup-seconds", "0.3", "--json", "--out", str(tmp_path / "t.json"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    (shape,) = document["shapes"]
    assert [s["concurrency"] for s in shape["steps"]] == [1, 4]
    assert all(s["rps"] > 0 and s["errors"] == 0 for s in shape["steps"])
    assert shape["recommended"]["concurrency"] in (1, 4)
    assert document["run"]["url"] == keyed
    assert "c=4" in done.stderr  # progress lines go to stderr under --json
    assert json.loads((tmp_path / "t.json").read_text()) == document


def saved_run(path: Path) -> Path:
    """A run as `tune --out` saves it, cut to what --reprice reads: one Cloud Run shape's steps."""
    steps = [{"concurrency": c, "rps": rps, "p50_ms": p99 / 2, "p99_ms": p99, "errors": 0, "cpu_util": cpu,
              "peak_rss_bytes": 200 * 2**20, "lower_bound": False}
             for c, rps, p99, cpu in ((1, 100.0, 20.0, 0.5), (2, 180.0, 40.0, 0.9), (4, 200.0, 90.0, 1.0))]  # fmt: skip
    path.write_text(json.dumps({"target": "cloudrun", "run": {"date": "2026-12-06T00:00:00Z", "model_sha256": "ab" * 32,
                                                              "where": "Docker"},
                                "shapes": [{"name": "1:2Gi", "steps": steps, "notes": []}]}))  # fmt: skip
    return path


def test_reprice_recommends_a_saved_run_again_under_another_objective(tmp_path):
    saved = saved_run(tmp_path / "saved.json")
    loose, tight = (json.loads(run_invoke("tune", "--reprice", str(saved), "--p99-ms", p99, "--json", "--out",
                                          str(tmp_path / f"{p99}.json")).stdout) for p99 in ("100", "50"))  # fmt: skip
    assert loose["shapes"][0]["recommended"]["concurrency"] == 4  # 200 rps, over 3% more than 180
    assert tight["shapes"][0]["recommended"]["concurrency"] == 2
    # 1 vCPU + 0.25 GiB (200 MiB + 128 MiB headroom, rounded up to 512 MiB: Cloud Run's least with gen2 is 512 Mi)
    # at the rate held at 60%: 1.2 in flight, 100 + 80 x 0.2 = 116 rps; CPU reaches 60% at 100 + 80 x 0.25 = 120.
    # (0.000024 + 0.5 x 0.0000025) / 116 x 1e6 + 0.40
    assert tight["shapes"][0]["usd_per_million"] == pytest.approx((0.000024 + 0.5 * 0.0000025) / 116 * 1e6 + 0.40,
                                                                  abs=1e-4)  # fmt: skip


def test_reprice_of_a_file_that_is_not_a_run_names_the_fix(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    refused(run_invoke("tune", "--reprice", str(tmp_path / "x.json")), "not a saved tune run", "--out")


def test_without_docker_and_without_root_the_fixes_are_named(monkeypatch, tmp_path):
    """No engine and a user who may not make cgroups: the run stops before anything starts (the test runs as root,
    so the user id is the one thing stood in for)."""
    from invoke import Config, Context

    from toolkit import tune as tune_module
    from toolkit.defaults import DEFAULTS

    monkeypatch.setattr(tune_module.os, "geteuid", lambda: 1000)
    context = Context(Config(overrides=DEFAULTS))
    context.config.tune.runtime = "process"
    plan = tune_module.Plan("cloudrun", [], 250, 1, 0, 8, [])
    with pytest.raises(tune_module.TuneError) as refusal:
        tune_module._runner(context, plan, "", "run", tmp_path)
    for fix in ("not root", "start Docker", "run as root", "--url", "--unconfined"):
        assert fix in str(refusal.value)
