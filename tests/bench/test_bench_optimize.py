"""`python -m bench.optimize`, the source of docs/optimizing.md's tables, runs end to end and prints a row for every
candidate of both models. The figures are not judged: benchmarks print, they do not fail."""

import subprocess
import sys

import pytest

from tests.support.models import ROOT

pytestmark = pytest.mark.slow  # every candidate of a 64x64 CNN is timed on 64-row batches


def test_bench_optimize_prints_both_tables():
    done = subprocess.run([sys.executable, "-m", "bench.optimize", "--seconds", "0.05"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("CPU flags: ")
    sections = done.stdout.split("\n## ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == ["MLP", "CNN"]
    for section in sections:
        lines = section.splitlines()
        rows = [line.split()[0] for line in lines if line.startswith("  ") and ("MB" in line or "kB" in line)]
        assert {"original", "optimized", "int8-dynamic", "int8-static"} <= set(rows)
        assert "PASS: " in section and "invoke release --target cloudrun" in section
