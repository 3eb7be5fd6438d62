from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.image import figures as image_figures
from tests.support.models import DEMO_MODEL, linear_model
from tests.support.storage_emulator import storage_emulator

# Tests write nothing into the checkout: hypothesis (under schemathesis) keeps its caches in the system's temp dir.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "onnx-serve-hypothesis"))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """One real gcp-storage-emulator for the session; tests use their own bucket names."""
    logs = tmp_path_factory.mktemp("emulator")
    with storage_emulator(log_path=logs / "emulator.log") as running:
        yield running


@pytest.fixture
def demo_model() -> Path:
    assert DEMO_MODEL.is_file(), "models/demo.onnx is missing: run python scripts/make_demo_model.py"
    return DEMO_MODEL


@pytest.fixture
def linear(tmp_path) -> Path:
    return linear_model(tmp_path / "linear.onnx")


# Stand-ins of the platforms' CLIs/APIs, as fixtures: `gcloud_stub` (real gcloud, local API) and `fake_flyctl`.
pytest_plugins = ["tests.support.gcloud_stub", "tests.support.fake_flyctl"]


# The image tests' figures, printed at the end of the run: here, because under pytest-xdist only this conftest is
# loaded by the controller, and the figures are measured in a worker, which hands them over when it finishes.
def pytest_sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if workeroutput is not None and image_figures.FIGURES:
        workeroutput["image_figures"] = (dict(image_figures.FIGURES), list(image_figures.WRITTEN))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    figures, written = getattr(node, "workeroutput", {}).get("image_figures", ({}, []))
    image_figures.FIGURES.update(figures)
    image_figures.WRITTEN.extend(written)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    image_figures.summary(terminalreporter)
