"""Session fixtures of the image tests: one Docker engine, one stand-in base image, one build of the project
image (through `invoke image.build`), one registry; and the figures the tests measure (tests/image/figures.py says
where they go)."""

from __future__ import annotations

import time

import pytest

from tests.image import figures as image_figures
from tests.image.tasks_cli import OUTPUT, TEST_TAG, run_invoke
from tests.support.base_image import BaseImage, build_base_image
from tests.support.docker_engine import DockerEngine, docker_engine
from tests.support.registry import local_registry


@pytest.fixture(scope="session")
def figures(tmp_path_factory) -> dict[str, object]:
    """Measurements to report; written as JSON when the session ends."""
    yield image_figures.FIGURES
    if image_figures.FIGURES:
        image_figures.write(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def docker(figures, tmp_path_factory) -> DockerEngine:
    OUTPUT["sbom_dir"] = tmp_path_factory.mktemp("sbom")
    with docker_engine() as engine:
        figures["docker_engine"] = "private dockerd (empty cache)" if engine.started_here else engine.host
        yield engine


@pytest.fixture(scope="session")
def base_image(docker: DockerEngine, figures) -> BaseImage:
    base = build_base_image(docker)
    figures["base_image"] = base.name
    figures["base_image_seconds"] = round(base.seconds, 1)
    figures["base_image_from_cache"] = base.from_cache
    return base


@pytest.fixture(scope="session")
def project_image(docker: DockerEngine, base_image: BaseImage, figures) -> str:
    """The project image, built once per session on the stand-in base; its local ref."""
    started = time.monotonic()
    built = run_invoke("image.build", "--tag", TEST_TAG, "--base-image", base_image.name, engine=docker)
    assert built.returncode == 0, f"invoke image.build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    figures["project_build_seconds"] = round(time.monotonic() - started, 1)
    return f"onnx-serve:{TEST_TAG}"


@pytest.fixture(scope="session")
def registry() -> str:
    with local_registry() as address:
        yield address
