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


UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under `--dist loadgroup`, xdist sends each `xdist_group` to one worker by suffixing its tests' node ids with
    "@group". If a pytest/xdist pairing stops doing that, the groups (one Docker engine, one heavy test at a time)
    silently run on every worker at once and race: each grouped test fails instead, naming the fix."""
    if not getattr(config.option, "loadgroup", False):  # set on an xdist worker under --dist loadgroup
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[UNGROUPED] = (
                "pytest-xdist did not put this test in its xdist_group: this pytest ignores xdist's node-id suffix, "
                "so grouped tests would race on every worker. Install the pinned versions: "
                "pip install -r requirements-dev.txt"
            )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    if UNGROUPED in item.stash:
        pytest.fail(item.stash[UNGROUPED], pytrace=False)


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
