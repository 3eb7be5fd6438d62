"""Debian packages that some tests need (docker.io, debootstrap, docker-registry), installed on demand.

CI starts on a fresh machine where they are missing; as root on Debian the tests install them, anywhere
else they skip (or fail under ONNX_SERVE_REQUIRE_TOOLS=1) through `missing_tool`.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.support.external import missing_tool

_apt_updated = False


def ensure_installed(command: str, package: str) -> str:
    """Path of `command`, installing `package` with apt-get first when it is missing and this machine allows."""
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        missing_tool(f"{command} is not installed and cannot be here (needs root and apt-get): install {package}")
    _apt_get("install", "-y", "--no-install-recommends", package)
    found = shutil.which(command)
    if not found:
        missing_tool(f"apt-get installed {package} but {command} is still not on PATH")
    return found


def _apt_get(*args: str) -> None:
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        _run_apt(["apt-get", "update"], env)
        _apt_updated = True
    _run_apt(["apt-get", *args], env)


def _run_apt(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        missing_tool(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
