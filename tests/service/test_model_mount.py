"""`--model-mount`: Cloud Run mounts the model's bucket read-only and MODEL_URI names the file in it. The service
opens it as a local file, with nothing downloaded or written there, and the sha256 check and warm-up still apply.
The mount is a real read-only bind mount of a directory holding the model (what gcsfuse presents, minus the network).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.external import missing_tool
from tests.support.server import run_service


@contextlib.contextmanager
def read_only_mount(source: Path, target: Path) -> Iterator[Path]:
    target.mkdir(parents=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        missing_tool(f"cannot make a read-only bind mount here ({mounted.stderr.strip()}): needs root/CAP_SYS_ADMIN")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.fixture
def bucket_mount(tmp_path, demo_model):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    shutil.copy(demo_model, bucket / "demo.onnx")
    with read_only_mount(bucket, tmp_path / "mnt" / "models") as mount:
        yield mount


def test_a_model_on_a_read_only_mount_is_verified_and_served_as_a_local_file(bucket_mount, tmp_path, demo_model):
    digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
    before = sorted(p.name for p in bucket_mount.iterdir())
    with run_service(str(bucket_mount / "demo.onnx"), tmp_path, MODEL_SHA256=digest,
                     MODEL_CACHE_DIR=str(tmp_path / "cache")) as service:
        health = service.wait_state("ready")
        assert service.predict({"inputs": {"features": [[1.0, 2.0, 3.0, 4.0]]}}).status_code == 200
    assert health["model"]["sha256"] == digest and health["model"]["generation"] is None
    assert sorted(p.name for p in bucket_mount.iterdir()) == before  # nothing written next to the model
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing downloaded


def test_a_mounted_model_with_another_sha256_is_never_served(bucket_mount, tmp_path):
    with run_service(str(bucket_mount / "demo.onnx"), tmp_path, MODEL_SHA256="0" * 64) as service:
        health = service.wait_state("failed")
    assert "sha256 mismatch" in health["error"]
