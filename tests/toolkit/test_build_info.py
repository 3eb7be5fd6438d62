"""What image serves: the build args the Dockerfile turns into BUILD_* variables reach /health as "build", and the
smoke test's --json shows them (real gunicorn, the demo model)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.models import ROOT
from tests.support.server import run_service

INVOKE = [sys.executable, "-m", "invoke"]
BUILD = {"BUILD_REVISION": "0123456789abcdef0123456789abcdef01234567", "BUILD_VERSION": "0123456",
         "BUILD_CREATED": "2026-12-04T15:00:00Z"}  # fmt: skip


def test_health_and_the_smoke_json_show_the_revision_the_image_was_built_from(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path, **BUILD) as service:
        done = subprocess.run([*INVOKE, "smoke", "--url", service.url, "--json"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = {"revision": BUILD["BUILD_REVISION"], "version": "0123456", "created": "2026-12-04T15:00:00Z"}
    assert report["build"] == expected
    assert report["health"]["build"] == expected


def test_a_service_run_outside_an_image_says_it_has_no_build(demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path) as service:
        done = subprocess.run([*INVOKE, "smoke", "--url", service.url, "--json"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["build"] == {"revision": None, "version": None, "created": None}
