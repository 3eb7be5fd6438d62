"""The project image, built on a stand-in for python:3.12-slim, run as Cloud Run and Fly run it: read-only root,
PORT set or not, the model fetched from Cloud Storage (an emulator), SIGTERM with a request in flight; pushed to a
registry and pulled back. Its size and build times are figures of the session (tests/image/conftest.py says where they go)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.image.containers import service_container
from tests.image.tasks_cli import TEST_TAG, run_invoke
from tests.support.models import ROOT, linear_model, reference_outputs, slow_model
from tests.support.registry import has_blob, image_manifest

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.xdist_group("docker")]  # image builds, on one worker

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [0.0, -1.0, 2.5, 100.0]]
GUNICORN_ARGS = ["--config", "service/gunicorn.conf.py", "service.app:app"]
APP_UID = "10001"
MB = 1_000_000

# Run inside the image as root, so that nothing is hidden from it by permissions.
SCAN_FILESYSTEM = r"""
import json, os, re
found = {"compilers": [], "pip_caches": [], "models": [], "app": []}
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for name in dirs + files:
        path = os.path.join(top, name)
        if re.fullmatch(r"(.*-)?(gcc|g\+\+|cc|c\+\+|clang)(-[0-9.]+)?", name) and name in files:
            found["compilers"].append(path)
        if name == "pip" and "/.cache" in top:
            found["pip_caches"].append(path)
        if name.endswith(".onnx") and "/site-packages/" not in top:  # onnxruntime ships sample models
            found["models"].append(path)
        if path.startswith("/app/"):
            found["app"].append(path)
print(json.dumps(found))
"""


def test_image_runs_gunicorn_in_exec_form_as_an_unprivileged_user(docker, project_image):
    config = json.loads(docker.docker("image", "inspect", "--format", "{{json .Config}}", project_image).stdout)
    assert config["Cmd"] == ["gunicorn", *GUNICORN_ARGS]
    assert not config.get("Entrypoint")
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    assert config["WorkingDir"] == "/app"
    assert list(config["ExposedPorts"]) == ["8080/tcp"]
    assert {"PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"} <= set(config["Env"])


def test_image_holds_the_service_code_and_no_compiler_pip_cache_or_model(docker, project_image):
    scan = docker.docker("run", "--rm", "--network", "none", "--user", "0", project_image, "python3", "-c", SCAN_FILESYSTEM)
    found = json.loads(scan.stdout)
    assert found["compilers"] == []
    assert found["pip_caches"] == []
    assert found["models"] == []
    # Exactly the work tree's service/ (less bytecode): no tests, .git, .env or models came along.
    service = [p for p in (ROOT / "service").rglob("*") if "__pycache__" not in p.parts]
    assert sorted(found["app"]) == sorted(["/app/service", *(f"/app/{p.relative_to(ROOT).as_posix()}" for p in service)])


def test_build_context_leaves_out_what_dockerignore_lists(docker, base_image, tmp_path):
    context = _copy_of_build_inputs(tmp_path / "context")
    planted = [".git/HEAD", ".venv/pyvenv.cfg", ".env", ".env.production", "model.onnx", "models/demo.onnx",
               "models/weights.bin", "tests/test_x.py", "bench/results/image.json", "service/__pycache__/app.pyc",
               ".pytest_cache/v/cache", "docs/guide.md", "README.md", "sa-key.json", "tls.pem", "dist/x.tar.gz"]  # fmt: skip
    for relative in planted:
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        (context / relative).write_text("must not reach the image\n")
    probe = tmp_path / "probe.Dockerfile"
    probe.write_text(f"FROM {base_image.name}\nCOPY . /context/\n")
    image_id = docker.docker("build", "--quiet", "--network", "none", "--file", str(probe), str(context)).stdout.strip()
    try:
        listing = docker.docker("run", "--rm", "--network", "none", image_id, "find", "/context", "-mindepth", "1").stdout
    finally:
        docker.docker("rmi", "--force", image_id, check=False)
    sent = {Path(line).relative_to("/context").as_posix() for line in listing.split()}
    assert not sent & set(planted)
    assert {p.split("/")[0] for p in sent} <= {"Dockerfile", ".dockerignore", "requirements.txt", "service"}
    assert {"requirements.txt", "service/app.py", "service/gunicorn.conf.py"} <= sent


@pytest.mark.parametrize("port", [None, 9090], ids=["PORT-unset", "PORT-9090"])
def test_loads_the_model_from_storage_and_predicts_like_onnxruntime(docker, project_image, tmp_path, port):
    model = linear_model(tmp_path / "linear.onnx")
    env = {"PORT": str(port)} if port else {}
    with service_container(docker, project_image, model, env, tmp_path, port=port or 8080) as service:
        health = service.wait_ready()
        assert health["status"] == "ready" and health["model"]["uri"].endswith("/linear.onnx")
        response = service.predict({"inputs": {"features": ROWS}}).result()
        assert response.status_code == 200, response.text
        expected = reference_outputs(model, {"features": np.array(ROWS, np.float32)})[0]
        np.testing.assert_allclose(response.json()["outputs"]["scores"], expected, rtol=1e-6)

        assert service.process_status()["Uid"].split() == [APP_UID] * 4  # real, effective, saved, filesystem
        command = service.command_line()
        assert command[1] == "/usr/local/bin/gunicorn" and command[2:] == GUNICORN_ARGS  # PID 1, no shell
        if port:
            with pytest.raises(httpx.ConnectError):
                service.netns.call(httpx.get, "http://127.0.0.1:8080/health", timeout=2)


def test_docker_stop_lets_the_request_in_flight_finish_and_exits_0_within_10s(docker, project_image, tmp_path):
    model = slow_model(tmp_path / "slow.onnx")  # an inference takes a second or more
    with service_container(docker, project_image, model, {"ORT_INTRA_OP_THREADS": "1"}, tmp_path) as service:
        service.wait_ready()
        in_flight = service.predict({"inputs": [[2.0]]})
        time.sleep(0.5)
        assert not in_flight.done(), "the request finished before the stop: the model is too fast for this test"
        started = time.monotonic()
        docker.docker("stop", "--time", "10", service.id)
        stopped_after = time.monotonic() - started
        response = in_flight.result(timeout=15)
        exit_code = docker.docker("inspect", "--format", "{{.State.ExitCode}}", service.id).stdout.strip()
    assert response.status_code == 200 and response.json()["outputs"]["y"] == [[2.0]]
    assert exit_code == "0"
    assert stopped_after < 10  # Cloud Run's SIGTERM-to-SIGKILL window


def test_push_to_a_registry_then_pull_back(docker, base_image, project_image, registry, figures):
    config = {"IMAGE_REGISTRY": registry}
    started = time.monotonic()
    built = run_invoke("image.build", "--tag", TEST_TAG, "--base-image", base_image.name, engine=docker, **config)
    assert built.returncode == 0, built.stderr
    figures["project_build_seconds_unchanged"] = round(time.monotonic() - started, 1)
    ref = f"{registry}/onnx-serve:{TEST_TAG}"
    image_id = _image_id(docker, ref)

    started = time.monotonic()
    pushed = run_invoke("image.push", "--tag", TEST_TAG, engine=docker, **config)
    assert pushed.returncode == 0, pushed.stderr
    figures["push_seconds"] = round(time.monotonic() - started, 1)
    manifest = image_manifest(registry, "onnx-serve", TEST_TAG)
    for blob in [manifest["config"], *manifest["layers"]]:
        assert has_blob(registry, "onnx-serve", blob["digest"]), blob

    docker.docker("rmi", ref)
    docker.docker("pull", ref)
    assert _image_id(docker, ref) == image_id
    docker.docker("rmi", ref)


def test_a_code_change_rebuilds_only_the_code_layer(docker, base_image, project_image, tmp_path, figures):
    context = _copy_of_build_inputs(tmp_path / "context")
    with open(context / "service" / "app.py", "a") as app:
        app.write("\n# a code-only change\n")
    changed = f"onnx-serve:{TEST_TAG}-code-change"
    started = time.monotonic()
    _build(docker, base_image, context, "--tag", changed)
    figures["project_build_seconds_code_change"] = round(time.monotonic() - started, 1)
    try:
        before, after = _layers(docker, project_image), _layers(docker, changed)
    finally:
        docker.docker("rmi", changed, check=False)
    assert len(before) == len(after)
    assert before[:-1] == after[:-1], "only the service/ layer may change: the dependencies layer was rebuilt"
    assert before[-1] != after[-1]


def test_image_size_over_the_base_is_the_installed_requirements(docker, base_image, project_image, figures):
    builder = f"onnx-serve:{TEST_TAG}-builder"
    _build(docker, base_image, ROOT, "--target", "builder", "--tag", builder)
    try:
        du = docker.docker("run", "--rm", "--network", "none", builder, "du", "-sb", "/install").stdout
    finally:
        docker.docker("rmi", builder, check=False)
    installed = int(du.split()[0])
    image, base = _image_size(docker, project_image), _image_size(docker, base_image.name)
    figures.update(
        image_mb=round(image / MB, 1),
        base_image_mb=round(base / MB, 1),
        image_over_base_mb=round((image - base) / MB, 1),
        requirements_installed_mb=round(installed / MB, 1),
        # exact, for bench/image.py
        image_bytes=image, base_image_bytes=base, requirements_installed_bytes=installed,
    )
    # Nothing but the installed requirements, the service code and the app user on top of the base
    # (du counts directories too, the image's size only files: hence a tolerance).
    assert abs((image - base) - installed) < 0.05 * installed


def _copy_of_build_inputs(context: Path) -> Path:
    """What the Dockerfile reads, copied, so a test can change or add files without touching the work tree."""
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "requirements.txt"):
        shutil.copy2(ROOT / name, context / name)
    shutil.copytree(ROOT / "service", context / "service", ignore=shutil.ignore_patterns("__pycache__"))
    return context


def _build(docker, base_image, context: Path, *args: str) -> None:
    """`docker build` as `invoke image.build` runs it (the session's build has cached every layer it can)."""
    docker.docker("build", "--quiet", "--platform", "linux/amd64", "--network", "host",
                  "--build-arg", f"BASE_IMAGE={base_image.name}", *args, str(context))  # fmt: skip


def _image_id(docker, ref: str) -> str:
    return docker.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def _image_size(docker, ref: str) -> int:
    return int(docker.docker("image", "inspect", "--format", "{{.Size}}", ref).stdout)


def _layers(docker, ref: str) -> list[str]:
    return json.loads(docker.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref).stdout)
