"""A private image registry on 127.0.0.1: Debian's `docker-registry` (Distribution 2.x) with storage in a temp dir.

Docker engines treat 127.0.0.0/8 registries as insecure (plain HTTP) without configuration, so an engine on
this machine pushes to and pulls from it as from any registry.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.support.debian_packages import ensure_installed
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.waiting import wait_for

MANIFEST_TYPES = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
# Straight to the registry on loopback, never through an HTTP(S)_PROXY from the environment.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def local_registry() -> Iterator[str]:
    """Yield "127.0.0.1:PORT" of a running registry; it is stopped by PID and its storage removed at exit."""
    binary = ensure_installed("docker-registry", "docker-registry")
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="onnx-serve-registry-") as workdir:
        config = Path(workdir) / "config.yml"
        config.write_text(json.dumps(_config(address, Path(workdir) / "storage")))  # JSON is YAML
        with open(Path(workdir) / "registry.log", "wb") as log:
            process = subprocess.Popen(
                [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for(lambda: _answers(address, process, Path(workdir) / "registry.log"), 30, what=f"registry at {address}")
            yield address
        finally:
            stop(process)


def _config(address: str, storage: Path) -> dict:
    return {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": address},
    }


def _answers(address: str, process: subprocess.Popen, log_path: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"docker-registry exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")
    try:
        with _direct.open(f"http://{address}/v2/", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def image_manifest(address: str, repository: str, tag: str) -> dict:
    """The manifest the registry serves for REPOSITORY:TAG (config and layer digests)."""
    request = urllib.request.Request(f"http://{address}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
    with _direct.open(request, timeout=10) as response:
        return json.load(response)


def has_blob(address: str, repository: str, digest: str) -> bool:
    request = urllib.request.Request(f"http://{address}/v2/{repository}/blobs/{digest}", method="HEAD")
    try:
        with _direct.open(request, timeout=10) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False
