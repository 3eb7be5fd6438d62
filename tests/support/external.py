"""Outside tools (docker engine, gcloud, ...) that some tests need.

A test that cannot find its tool skips with the reason; CI sets ONNX_SERVE_REQUIRE_TOOLS=1 so that the same
situation fails instead, and no test is silently left out there.
"""

import os

import pytest

REQUIRE_ENV = "ONNX_SERVE_REQUIRE_TOOLS"


def tools_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").lower() in {"1", "true", "yes"}


def missing_tool(reason: str) -> None:
    """Skip the calling test (or fixture) with `reason`, or fail it when tools are required."""
    if tools_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)
