"""`invoke bench --quick` end to end, as CI's smoke run of the benchmarks: every figure lands in the JSON, each
beside its floor, ratio and target. The figures themselves are not judged: benchmarks print, they do not fail."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.models import ROOT

INVOKE = Path(sys.executable).with_name("invoke")
FIGURES = {
    *(f"{kind}_{model}" for kind in ("ready", "first_health") for model in ("demo", "50mb", "200mb")),
    "peak_rss_200mb",
    *(f"predict_c{clients}_{what}" for clients in (1, 8, 64) for what in ("rps", "p50", "p99", "errors")),
    "large_request_10k",
    "image_bytes",
    "image_over_base_bytes",
}
MEASURED_ELSEWHERE = {"image_bytes", "image_over_base_bytes"}  # by the container tests, when they have run


def test_quick_bench_writes_every_figure_beside_its_floor_and_target(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([str(INVOKE), "bench", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["quick"] is True and document["machine"]["cpus"] >= 1 and document["load_generator"]
    figures = document["figures"]
    assert set(figures) == FIGURES
    for key, figure in figures.items():
        if key in MEASURED_ELSEWHERE and figure["value"] is None:
            assert "not measured" in figure["note"]
            continue
        assert figure["value"] is not None and figure["value"] >= 0, key
        if figure["floor_label"]:
            assert figure["floor"] > 0, key
            assert figure["ratio"] == pytest.approx(figure["value"] / figure["floor"]), key
        if figure["target"]:
            assert figure["met"] in (True, False), key
    assert figures["predict_c1_errors"]["target"] == "== 0"
    table = result.stdout
    assert "| figure" in table and "ratio <= 1.3" in table and "load generator:" in table
