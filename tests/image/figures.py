"""The figures the image tests measure (image size, build times, SBOM size), kept for the end of the run.

The session fixture `figures` (tests/image/conftest.py) fills FIGURES and writes them as JSON when the session ends:
to the session's temp dir, or to $ONNX_SERVE_IMAGE_FIGURES when set (`invoke bench` reads bench/results/image.json:
`ONNX_SERVE_IMAGE_FIGURES=bench/results/image.json pytest tests/image` records them). Under pytest-xdist the tests
run in a worker, whose output the terminal never sees: tests/conftest.py hands the figures to the controller, which
prints them (`summary`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FIGURES_ENV = "ONNX_SERVE_IMAGE_FIGURES"
FIGURES: dict[str, object] = {}
WRITTEN: list[str] = []


def write(basetemp: Path) -> None:
    """Write FIGURES as JSON where the module's docstring says, and remember where."""
    given = os.environ.get(FIGURES_ENV)
    path = Path(given) if given else basetemp / "image.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
    WRITTEN.append(str(path))


def summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("container image figures")
        for key, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{key}: {value}")
        for path in dict.fromkeys(WRITTEN):  # each file once: a worker's and the controller's lists can both hold it
            terminalreporter.write_line(f"(written to {path}; {FIGURES_ENV}=bench/results/image.json keeps them for invoke bench)")
