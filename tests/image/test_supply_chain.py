"""The image's supply chain with a real Docker engine and the stand-in base: a wheel whose hash differs from the
lock fails the build with pip's message; every build carries OCI labels naming its commit and its base (by digest,
also for a base pinned by digest or given by tag); the SBOM lists every package of the lock at its version."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import time

import pytest

from tests.image.containers import service_container
from tests.image.tasks_cli import OUTPUT, TEST_TAG, run_invoke
from tests.image.test_image import _copy_of_build_inputs
from tests.support.models import ROOT, linear_model

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.xdist_group("docker")]  # image builds, on one worker

OCI = "org.opencontainers.image."
LOCK_PIN = re.compile(r"^([a-z0-9._-]+)==(\S+)", re.MULTILINE)


def _labels(docker, ref: str) -> dict[str, str]:
    return json.loads(docker.docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref).stdout)


def _image_id(docker, ref: str) -> str:
    return docker.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_every_build_is_labelled_with_its_commit_time_version_and_base_digest(docker, base_image, project_image):
    labels = _labels(docker, project_image)
    revision = _git("rev-parse", "HEAD") + ("-dirty" if _git("status", "--porcelain") else "")
    assert labels[OCI + "revision"] == revision
    assert labels[OCI + "version"] == TEST_TAG
    created = datetime.datetime.fromisoformat(labels[OCI + "created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    # The stand-in base was imported, never pulled: it has no registry digest, so its image ID is recorded.
    assert labels[OCI + "base.name"] == base_image.name
    assert labels[OCI + "base.digest"] == _image_id(docker, base_image.name)
    env = json.loads(docker.docker("image", "inspect", "--format", "{{json .Config.Env}}", project_image).stdout)
    assert {f"BUILD_REVISION={revision}", f"BUILD_VERSION={TEST_TAG}", f"BUILD_CREATED={labels[OCI + 'created']}"} <= set(env)


def test_the_running_image_shows_its_revision_on_health(docker, project_image, tmp_path):
    labels = _labels(docker, project_image)
    with service_container(docker, project_image, linear_model(tmp_path / "linear.onnx"), {}, tmp_path) as service:
        health = service.wait_ready()
    assert health["build"] == {"revision": labels[OCI + "revision"], "version": TEST_TAG,
                               "created": labels[OCI + "created"]}  # fmt: skip


def test_the_sbom_lists_every_locked_package_at_its_pinned_version_and_the_base(docker, base_image, project_image, figures):
    sbom = OUTPUT["sbom_dir"] / f"onnx-serve_{TEST_TAG}.cdx.json"
    bom = json.loads(sbom.read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5"
    packages = {c["name"].lower().replace("_", "-"): c["version"] for c in bom["components"] if c["type"] == "library"}
    locked = dict(LOCK_PIN.findall((ROOT / "requirements.txt").read_text()))
    assert {"onnxruntime", "numpy", "fastapi"} <= set(locked)
    missing = {name: version for name, version in locked.items() if packages.get(name) != version}
    assert missing == {}, f"in the lock but not in the SBOM at that version: {missing}"
    assert not [name for name in packages if name.startswith("cyclonedx")], "the generator must not be in the image"
    properties = {p["name"]: p["value"] for p in bom["metadata"]["properties"]}
    labels = _labels(docker, project_image)
    assert properties[OCI + "base.digest"] == labels[OCI + "base.digest"]
    assert properties[OCI + "revision"] == labels[OCI + "revision"]
    base = [c for c in bom["components"] if c["bom-ref"] == "base-image"]
    assert base == [{"type": "container", "bom-ref": "base-image", "name": base_image.name,
                     "version": labels[OCI + "base.digest"], "description": "the image's base"}]  # fmt: skip
    figures["sbom_components"] = len(packages)


def test_a_wheel_whose_hash_differs_from_the_lock_fails_the_build_with_pips_message(docker, base_image, tmp_path):
    context = _copy_of_build_inputs(tmp_path / "context")
    lock = context / "requirements.txt"
    # Every recorded hash of one package replaced: as if the index (or a mirror) served a different file.
    text, count = re.subn(r"(^annotated-doc==\S+ \\\n(?:    --hash=sha256:\w+ \\\n)*    --hash=sha256:)\w+",
                          lambda m: m.group(1) + "0" * 64, lock.read_text(), flags=re.MULTILINE)  # fmt: skip
    text = re.sub(r"(^annotated-doc==\S+ \\\n)(    --hash=sha256:\w+ \\\n)+", r"\1", text, flags=re.MULTILINE)
    assert count == 1
    lock.write_text(text)
    done = docker.docker("build", "--platform", "linux/amd64", "--network", "host", "--target", "builder",
                         "--build-arg", f"BASE_IMAGE={base_image.name}", str(context), check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE" in output, output[-3000:]
    assert "annotated-doc" in output and "0" * 64 in output


def test_a_base_pinned_by_digest_or_given_by_tag_is_recorded_by_its_registry_digest(docker, base_image, registry,
                                                                                     project_image, figures):
    """The stand-in base pushed to a registry and pulled back has a registry digest, as python:3.12-slim does."""
    remote = f"{registry}/python:3.12-slim"
    docker.docker("tag", base_image.name, remote)
    pushed = docker.docker("push", remote).stdout
    digest = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed).group(1)
    docker.docker("rmi", remote)
    docker.docker("pull", remote)  # now it has RepoDigests, like any pulled base

    pinned = f"{registry}/python@{digest}"
    started = time.monotonic()
    built = run_invoke("image.build", "--tag", f"{TEST_TAG}-pinned", "--base-image", pinned, engine=docker)
    figures["project_build_seconds_pinned_base"] = round(time.monotonic() - started, 1)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert f"base image {registry}/python pinned at {digest}" in built.stdout
    labels = _labels(docker, f"onnx-serve:{TEST_TAG}-pinned")
    assert (labels[OCI + "base.name"], labels[OCI + "base.digest"]) == (f"{registry}/python", digest)

    by_tag = run_invoke("image.build", "--tag", f"{TEST_TAG}-by-tag", "--base-image", remote, engine=docker)
    assert by_tag.returncode == 0, by_tag.stdout[-3000:] + by_tag.stderr[-3000:]
    assert f"base image {remote} resolved to {digest}; pin it with image.base_image: {registry}/python@{digest}" \
        in by_tag.stdout
    labels = _labels(docker, f"onnx-serve:{TEST_TAG}-by-tag")
    assert (labels[OCI + "base.name"], labels[OCI + "base.digest"]) == (remote, digest)
    for ref in (f"onnx-serve:{TEST_TAG}-pinned", f"onnx-serve:{TEST_TAG}-by-tag", remote):
        docker.docker("rmi", ref, check=False)


def test_a_dirty_build_is_refused_for_a_cloud_registry_unless_allowed(docker, base_image, registry, tmp_path):
    ref = f"{registry}/onnx-serve:{TEST_TAG}-dirty"
    probe = tmp_path / "Dockerfile"
    probe.write_text(f"FROM {base_image.name}\nLABEL {OCI}revision=0123abc-dirty\n")
    docker.docker("build", "--quiet", "--network", "none", "--tag", ref, str(tmp_path))
    config = {"IMAGE_REGISTRY": registry, "FLY_APP": "my-app"}  # a Fly push, to this registry
    refused = run_invoke("image.push", "--target", "fly", "--tag", f"{TEST_TAG}-dirty", engine=docker, **config)
    assert refused.returncode == 1
    assert "The image comes from uncommitted changes (0123abc-dirty)" in refused.stderr
    assert "--allow-dirty" in refused.stderr
    allowed = run_invoke("image.push", "--target", "fly", "--tag", f"{TEST_TAG}-dirty", "--allow-dirty", engine=docker,
                         **config)  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    docker.docker("rmi", ref, check=False)
