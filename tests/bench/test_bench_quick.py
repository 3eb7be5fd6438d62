"""`invoke bench --quick` end to end, as CI's smoke run of the benchmarks: every figure lands in the JSON, each
beside its floor, ratio and target, and the side-by-side table has every server at every concurrency on both
models, each row measured. The figures themselves are not judged: benchmarks print, they do not fail."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.base_image import default_cache_dir
from tests.support.models import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]  # the bench, about 2 minutes; alone under -n

INVOKE = Path(sys.executable).with_name("invoke")
FIGURES = {
    *(f"{kind}_{model}" for kind in ("ready", "first_health") for model in ("demo", "50mb", "200mb")),
    "peak_rss_200mb",
    "peak_rss_external",
    "large_request_10k",
    "large_request_10k_v2_json",
    "large_request_10k_v2_binary",
    *(f"network_ready_{model}{way}" for model in ("64mb", "64mb_external") for way in ("", "_one_stream")),
    "image_bytes",
    "image_over_base_bytes",
}
MEASURED_ELSEWHERE = {"image_bytes", "image_over_base_bytes"}  # by the container tests, when they have run
V2_FIGURES = {"large_request_10k_v2_json", "large_request_10k_v2_binary"}  # once the service has the V2 route
SERVERS = ("floor", "service", "FastAPI (seed)", "LitServe")
MODELS = ("demo model", "MLP")
CLIENTS = (1, 8, 64)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # What the bench makes once (models, LitServe's venv) is kept outside the checkout, and across runs.
    env = {**os.environ, "ONNX_SERVE_BENCH_CACHE": str(default_cache_dir() / "bench")}
    result = subprocess.run([str(INVOKE), "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=420)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_quick_bench_writes_every_figure_beside_its_floor_and_target(quick_run):
    document, table = quick_run
    assert document["quick"] is True and document["machine"]["cpus"] >= 1 and document["load_generator"]
    figures = document["figures"]
    assert set(figures) == FIGURES
    for key, figure in figures.items():
        if key in MEASURED_ELSEWHERE and figure["value"] is None:
            assert "not measured" in figure["note"]
            continue
        if key in V2_FIGURES and figure["value"] is None:
            assert figure["note"] == "not measured: route answers 404"
            continue
        assert figure["value"] is not None and figure["value"] >= 0, key
        if figure["floor_label"]:
            assert figure["floor"] > 0, key
            assert figure["ratio"] == pytest.approx(figure["value"] / figure["floor"]), key
        if figure["target"]:
            assert figure["met"] in (True, False), key
    assert "| figure" in table and "ratio <= 1.3" in table and "load generator:" in table


def test_quick_bench_measures_every_server_side_by_side_without_errors(quick_run):
    document, table = quick_run
    rows = document["side_by_side"]
    assert [(r["model"], r["clients"], r["server"]) for r in rows] == [
        (model, clients, server) for model in MODELS for clients in CLIENTS for server in SERVERS
    ]
    for row in rows:
        where = f"{row['server']}, {row['model']}, {row['clients']} clients"
        assert row["errors"] == 0, where
        for key in ("requests_per_second", "p50", "p99", "rps_ratio", "p99_ratio", "server_cpu_share",
                    "loadgen_cpu_share", "requests_per_cpu_second"):
            assert math.isfinite(row[key]) and row[key] > 0, f"{key} of {where}: {row[key]}"
        assert math.isfinite(row["others_cpu_share"]) and row["others_cpu_share"] >= 0, where
        assert row["p50"] <= row["p99"], where
        assert row["met"] in ((True, False) if row["server"] == "service" else (None,)), where
        assert f"| {row['model']}" in table and row["server"] in table
    assert {r["rps_ratio"] for r in rows if r["server"] == "floor"} == {1.0}
    # Each server says which event loop and HTTP parser it ran, and they are the same for all.
    assert set(document["runtimes"]) == set(SERVERS) and len(set(document["runtimes"].values())) == 1
    assert "unknown" not in next(iter(document["runtimes"].values()))
