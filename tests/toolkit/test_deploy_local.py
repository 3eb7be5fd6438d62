"""`invoke deploy --target local` end to end on a fresh clone: the README's main command."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.support.models import ROOT
from tests.support.ports import free_port
from tests.support.waiting import wait_for


@pytest.mark.slow
def test_deploy_local_on_a_fresh_clone_serves_the_demo_model(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    port = free_port()
    # runtime=process: no Docker engine is assumed on a newcomer's machine (the image tests cover Docker).
    env = {**os.environ, "INVOKE_LOCAL_PORT": str(port), "INVOKE_LOCAL_RUNTIME": "process"}
    env["METRICS_PORT"] = str(free_port())  # not the default 9091, which parallel runs on this machine share
    invoke = [sys.executable, "-m", "invoke"]
    try:
        result = subprocess.run([*invoke, "deploy", "--target", "local"], cwd=clone, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        url = f"http://127.0.0.1:{port}"
        assert f"started the service (process) at {url}" in result.stdout
        assert "smoke test passed" in result.stdout and f"curl -s -X POST {url}/predict" in result.stdout
        answer = httpx.post(f"{url}/predict", json={"inputs": {"features": [[5.1, 3.5, 1.4, 0.2]]}})
        assert answer.status_code == 200
        assert len(answer.json()["outputs"]["probabilities"][0]) == 3
        assert httpx.get(f"{url}/health").json()["model"]["uri"] == "models/demo.onnx"
    finally:
        stopped = subprocess.run([*invoke, "local.stop"], cwd=clone, env=env, capture_output=True, text=True,
                                 timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped gunicorn" in stopped.stdout

    def refused():
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except httpx.TransportError:
            return True
        return False

    wait_for(refused, 15, what="the local service to stop")


def test_dry_run_prints_the_commands(tmp_path):
    env = {**os.environ, "INVOKE_LOCAL_RUNTIME": "process"}
    result = subprocess.run([sys.executable, "-m", "invoke", "deploy", "--target", "local", "--dry-run"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gunicorn -c service/gunicorn.conf.py service.app:app" in result.stdout
    assert "# then: smoke test http://127.0.0.1:8080" in result.stdout
