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
