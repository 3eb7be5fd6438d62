"""`invoke image.*` as a user runs it: the real CLI, in the project root, configured only through INVOKE_* variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.docker_engine import DockerEngine
from tests.support.models import ROOT

INVOKE = [sys.executable, "-m", "invoke"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TEST_TAG = "tests"  # what the session's build of the project image is tagged
# Where the tests' builds write their SBOMs: a directory of the session (the `docker` fixture sets it), never the
# checkout's build/sbom.
OUTPUT: dict[str, Path] = {}


def run_invoke(
    *args: str, engine: DockerEngine | None = None, env: dict[str, str] | None = None, timeout: float = 900, **config: str
) -> subprocess.CompletedProcess:
    """Run `invoke ARGS`; `config` sets Invoke settings (IMAGE_REGISTRY="..." is INVOKE_IMAGE_REGISTRY). The output
    comes back without colours."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}, **(env or {})}
    if engine:
        # The engine's own network for builds: a private engine has no bridge, and none is wanted.
        env.update(DOCKER_HOST=engine.host, INVOKE_IMAGE_BUILD_NETWORK="host")
        if "sbom_dir" in OUTPUT:
            env["INVOKE_IMAGE_SBOM_DIR"] = str(OUTPUT["sbom_dir"])
    env.update({f"INVOKE_{key}": value for key, value in config.items()})
    done = subprocess.run([*INVOKE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    done.stdout, done.stderr = ANSI.sub("", done.stdout), ANSI.sub("", done.stderr)
    return done
