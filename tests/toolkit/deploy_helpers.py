"""Run the project's Invoke tasks as a user does (a subprocess in the project root) and live services for their
smoke tests to reach."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.models import ROOT

INVOKE = [sys.executable, "-m", "invoke"]


def invoke(*args: str, timeout: float = 300, stdin: str | None = None, **config: str) -> subprocess.CompletedProcess:
    """`invoke ARGS` with config given as INVOKE_* variables, e.g. gcp_project="p" -> INVOKE_GCP_PROJECT=p."""
    env = {**os.environ, **{f"INVOKE_{key.upper()}": value for key, value in config.items()}}
    return subprocess.run([*INVOKE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          input=stdin)  # fmt: skip
