"""`python -m bench.side_by_side`, the A/B over HTTP that docs/benchmarks.md's round 4 was measured with: the
floor and two services from this checkout (one with the metrics off) serve load together, and each gets its line."""

import re
import subprocess
import sys

import pytest

from tests.support.models import ROOT

pytestmark = pytest.mark.slow  # three servers under load


def test_the_floor_and_each_named_service_get_their_figures():
    done = subprocess.run(
        [sys.executable, "-m", "bench.side_by_side", "demo", "2", "1", "0.5", f"plain={ROOT}",
         f"nometrics={ROOT}:METRICS_PORT=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.lstrip().startswith("2 clients"))
    floor = re.search(r"floor ([\d,]+) req/s", line)
    assert floor and int(floor.group(1).replace(",", "")) > 0
    for name in ("plain", "nometrics"):
        figures = re.search(rf"\| {name} ([\d.]+)x, p99 ([\d.]+)x, CPU (\d+) us/req, (\d+) errors", line)
        assert figures, line
        assert float(figures.group(1)) > 0 and int(figures.group(3)) > 0 and figures.group(4) == "0"


def test_a_directory_that_is_not_a_checkout_is_refused_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.side_by_side", "demo", "2", "1", "0.5", f"x={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "not a checkout of this project" in done.stderr
