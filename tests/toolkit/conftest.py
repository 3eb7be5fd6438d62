import pytest

from tests.support.models import DEMO_MODEL
from tests.support.server import run_service


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A real service with the demo model: what a good revision or release serves."""
    with run_service(str(DEMO_MODEL), tmp_path_factory.mktemp("healthy")) as service:
        service.wait_state("ready")
        yield service.url


SERVICE_KEY = "smoke-key-4mJ8qZ2xV7nB3wT9"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A real service with the demo model behind an API key (API_KEYS=SERVICE_KEY)."""
    with run_service(str(DEMO_MODEL), tmp_path_factory.mktemp("keyed"), API_KEYS=SERVICE_KEY) as service:
        service.wait_state("ready")
        yield service.url


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A real service whose model fails to load: what a bad revision or release serves."""
    directory = tmp_path_factory.mktemp("broken")
    corrupt = directory / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with run_service(str(corrupt), directory) as service:
        service.wait_state("failed")
        yield service.url
