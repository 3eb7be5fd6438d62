"""`invoke model.optimize`: real models made with onnx (an MLP, a small CNN, the demo model, a model int8 does not
cover), their candidates made by onnxruntime's own tools and judged by the compare's engine; the chosen file served
by the real service; strict gates, bad input and a gs:// destination on the storage emulator. The task runs as a user
runs it (a subprocess of `invoke`) for exit codes and output; other figures are read from `optimize_model`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support.models import DEMO_MODEL, ROOT, cnn_model, mlp_model, reference_outputs, two_input_model
from tests.support.server import run_service
from tests.toolkit.deploy_helpers import INVOKE
from toolkit.compare import Thresholds
from toolkit.optimize import optimize_model

FAST = {"speed_seconds": 0.1}  # speed figures are checked for being there and ranking, not for their size
ALL = ("optimized", "int8-dynamic", "int8-static")


def run_optimize(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")} | (env or {})
    return subprocess.run([*INVOKE, "model.optimize", "--speed-seconds", "0.1", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    """MatMul-heavy: features float32 [N, 64] -> scores float32 [N, 8]."""
    return mlp_model(tmp_path_factory.mktemp("mlp") / "mlp.onnx", widths=(64, 256, 256, 8))


def test_the_mlp_candidate_chosen_is_written_with_its_sha256_and_the_service_serves_it(mlp, tmp_path):
    out = tmp_path / "cheaper.onnx"

    done = run_optimize("--model", str(mlp), "--out", str(out), "--max-abs-diff", "1", "--min-agreement", "0.9",
                        "--json")  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    rows = {row["candidate"]: row for row in document["candidates"]}
    assert list(rows) == list(ALL) and document["verdict"] == "pass"
    for row in rows.values():  # every candidate applies to an MLP and is judged with figures
        assert row["verdict"] == "pass", row.get("failures") or row.get("not_made")
        assert row["signature"]["breaking"] == [] and row["size_bytes"] > 0
        assert row["latency"]["single_row"]["candidate"]["p50_ms"] > 0
        assert row["latency"]["batch"]["candidate"]["rows_per_second"] > 0
        assert row["outputs"]["scores"]["requests"] == 64
    assert rows["optimized"]["outputs"]["scores"]["max_abs_diff"] < 1e-4
    for name in ("int8-dynamic", "int8-static"):  # int8 weights: a quarter of the float32 ones, and some drift
        assert rows[name]["size_bytes"] < mlp.stat().st_size / 2
        assert rows[name]["outputs"]["scores"]["max_abs_diff"] > 0
    # int8-dynamic takes its range from the whole batch, so the service's self-test turns batching off for it
    assert rows["int8-dynamic"]["batching"]["enabled"] is False and rows["optimized"]["batching"]["enabled"] is True
    chosen = document["chosen"]
    ratios = {name: row["served_rows_per_second_ratio"] for name, row in rows.items()}
    assert chosen["candidate"] == max(ratios, key=ratios.get)
    assert Path(chosen["out"]) == out and sha256(out) == chosen["sha256"] == rows[chosen["candidate"]]["sha256"]
    assert chosen["release_command"] == (f"invoke release --target cloudrun --model gs://BUCKET/cheaper.onnx "
                                         f"--sha256 {chosen['sha256']}")  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["cheaper.onnx"]  # no temp file left beside it

    rows_in = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    expected = reference_outputs(out, {"features": rows_in[:1]})[0]
    with run_service(str(out), tmp_path, MODEL_SHA256=chosen["sha256"]) as service:
        health = service.wait_state("ready")
        answer = service.predict({"inputs": {"features": rows_in[:1].tolist()}})
    assert health["model"]["sha256"] == chosen["sha256"]
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(np.array(answer.json()["outputs"]["scores"], np.float32), expected, rtol=1e-6)


def test_the_text_report_has_one_table_and_the_release_command(mlp, tmp_path):
    out = tmp_path / "cheaper.onnx"

    done = run_optimize("--model", str(mlp), "--out", str(out), "--candidates", "optimized,int8-dynamic")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    table = done.stdout.split("  candidate ", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["original", "optimized", "int8-dynamic"]
    assert "int8-dynamic: the service would not batch it" in done.stdout
    assert f"invoke release --target cloudrun --model gs://BUCKET/cheaper.onnx --sha256 {sha256(out)}" in done.stdout


def test_strict_gates_no_lossy_candidate_meets_exit_1_naming_each_gate_and_write_nothing(mlp, tmp_path):
    out = tmp_path / "never.onnx"

    done = run_optimize("--model", str(mlp), "--out", str(out), "--candidates", "int8-dynamic,int8-static",
                        "--max-abs-diff", "0", "--min-agreement", "1")  # fmt: skip

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "FAIL: no candidate holds every gate; nothing written" in done.stdout
    for name in ("int8-dynamic", "int8-static"):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(name))
        assert "FAIL: max_abs_diff" in line
        assert f"{name}: output 'scores': max abs diff" in done.stdout


def test_strict_gates_with_every_candidate_leave_only_an_exact_one(mlp, tmp_path):
    """max abs diff 0: the int8 candidates fail; the offline-optimized graph wins only if it gives the same numbers."""
    out = tmp_path / "exact.onnx"

    report = optimize_model(str(mlp), thresholds=Thresholds(max_abs_diff=0.0, min_agreement=1.0), out=str(out), **FAST)

    verdicts = {c.name: c.verdict() for c in report.candidates}
    assert verdicts["int8-dynamic"] == verdicts["int8-static"] == "fail"
    optimized = next(c for c in report.candidates if c.name == "optimized")
    if report.ok:
        assert report.document["chosen"]["candidate"] == "optimized"
        assert optimized.report.document["outputs"]["scores"]["max_abs_diff"] == 0
        assert sha256(out) == report.document["chosen"]["sha256"]
    else:
        assert optimized.report.failures and not out.exists()


def test_a_small_cnn_gets_static_int8_calibrated_on_the_given_bodies(tmp_path):
    model = cnn_model(tmp_path / "cnn.onnx", size=16, channels=(8, 16))
    images = np.random.default_rng(3).standard_normal((6, 1, 3, 16, 16)).astype(np.float32)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"inputs": {"image": image.tolist()}}) + "\n" for image in images))
    out = tmp_path / "out" / "cnn.onnx"
    out.parent.mkdir()

    report = optimize_model(str(model), calibration=str(calibration), out=str(out),
                            thresholds=Thresholds(max_abs_diff=1.0), **FAST)  # fmt: skip

    rows = {row["candidate"]: row for row in report.document["candidates"]}
    assert report.document["calibration"] == f"6 request(s) from {calibration}"
    assert "Conv" in report.document["model"]["operators"]
    static = rows["int8-static"]
    assert static["verdict"] == "pass" and "calibrated on 6 request(s)" in static["how"]
    assert static["outputs"]["scores"]["max_abs_diff"] > 0 and static["size_bytes"] < model.stat().st_size
    assert sha256(out) == report.document["chosen"]["sha256"]


def test_the_demo_model_is_judged_and_its_choice_written(tmp_path):
    out = tmp_path / "demo.cheaper.onnx"

    report = optimize_model(str(DEMO_MODEL), out=str(out), **FAST)

    assert report.ok
    rows = {row["candidate"]: row for row in report.document["candidates"]}
    assert set(rows["optimized"]["outputs"]) == {"logits", "probabilities"}
    assert all(row["verdict"] == "pass" for row in rows.values())
    assert sha256(out) == report.document["chosen"]["sha256"]
    assert DEMO_MODEL.read_bytes() != out.read_bytes() or report.document["chosen"]["candidate"] == "optimized"


def test_a_model_whose_operators_int8_does_not_cover_says_so_and_keeps_the_exact_graph(tmp_path):
    model = two_input_model(tmp_path / "cast_mul.onnx")  # Cast and Mul: no weights to quantize
    out = tmp_path / "out.onnx"

    done = run_optimize("--model", str(model), "--out", str(out), "--max-abs-diff", "0", "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    rows = {row["candidate"]: row for row in document["candidates"]}
    for name in ("int8-dynamic", "int8-static"):
        assert rows[name]["verdict"] == "not made"
        assert rows[name]["not_made"].startswith("does not apply: none of the model's operators (Cast, Mul)")
    assert document["chosen"]["candidate"] == "optimized" and sha256(out) == document["chosen"]["sha256"]


def test_a_model_with_external_data_files_gives_candidates_of_one_file(tmp_path):
    from tests.support.zoo import external_data_model

    model = external_data_model(tmp_path / "model", megabytes=0.5)  # model.onnx, model.onnx.data, weights/w2.bin
    out = tmp_path / "out" / "one.onnx"
    out.parent.mkdir()

    report = optimize_model(str(model), out=str(out), candidates=["optimized", "int8-static"], **FAST)

    assert report.ok, report.text()
    assert [row["verdict"] for row in report.document["candidates"]] == ["pass", "pass"]
    assert list(out.parent.iterdir()) == [out]  # one file, which onnxruntime opens on its own
    assert sha256(out) == report.document["chosen"]["sha256"]
    features = np.ones((2, 8), np.float32)
    shapes = [reference_outputs(path, {"features": features})[0].shape for path in (out, model)]
    assert shapes[0] == shapes[1] == (2, shapes[1][1])


# --- bad input: a clear error, exit 2, no traceback, nothing written -------------------------------------------


def test_a_file_onnxruntime_cannot_open_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = tmp_path / "out.onnx"

    done = run_optimize("--model", str(bad), "--out", str(out))

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a model onnxruntime can open" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_samples_the_model_refuses_are_refused_naming_the_request(mlp, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"inputs": {"features": [[1.0] * 64]}}) + "\n"
                       + json.dumps({"inputs": {"features": [[1.0, 2.0]]}}) + "\n")  # fmt: skip
    out = tmp_path / "out.onnx"

    done = run_optimize("--model", str(mlp), "--samples", str(samples), "--out", str(out), "--json")

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--samples {samples} request 2: the model refuses it" in done.stderr
    assert json.loads(done.stdout)["verdict"] == "error"
    assert not out.exists()


@pytest.mark.parametrize("where", ["missing-folder", "under-a-file", "a-folder"])
def test_an_out_it_cannot_write_is_refused_before_any_work(mlp, tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = {"missing-folder": tmp_path / "nope" / "m.onnx", "under-a-file": tmp_path / "file" / "m.onnx",
           "a-folder": tmp_path}[where]  # fmt: skip

    done = run_optimize("--model", str(mlp), "--out", str(out))

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--out {out}" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_default_out_is_beside_the_model_named_after_the_candidate(tmp_path):
    model = two_input_model(tmp_path / "scale.onnx")

    done = run_optimize("--model", str(model), "--candidates", "optimized", "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    chosen = json.loads(done.stdout)["chosen"]
    written = tmp_path / "scale.optimized.onnx"
    assert chosen["out"] == str(written) and sha256(written) == chosen["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scale.onnx", "scale.optimized.onnx"]


# --- gs:// out: uploaded with its generation, served from there ---------------------------------------------------


def test_gs_out_uploads_the_chosen_model_and_the_service_serves_that_generation(emulator, mlp, tmp_path):
    emulator.client().create_bucket("optimized-models")

    done = run_optimize("--model", str(mlp), "--out", "gs://optimized-models/mlp/v2.onnx", "--candidates",
                        "int8-static", "--json", env=emulator.env)  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    chosen = json.loads(done.stdout)["chosen"]
    uri = f"gs://optimized-models/mlp/v2.onnx#{chosen['generation']}"
    assert chosen["uri"] == uri
    assert chosen["release_command"] == f"invoke release --target cloudrun --model {uri} --sha256 {chosen['sha256']}"
    blob = emulator.client().bucket("optimized-models").get_blob("mlp/v2.onnx")
    assert blob.generation == chosen["generation"]
    stored = tmp_path / "stored.onnx"
    blob.download_to_filename(str(stored))
    assert sha256(stored) == chosen["sha256"]

    features = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    with run_service(uri, tmp_path, MODEL_SHA256=chosen["sha256"], **emulator.env) as service:
        service.wait_state("ready")
        answer = service.predict({"inputs": {"features": features.tolist()}})
    assert answer.status_code == 200, answer.text
    expected = reference_outputs(stored, {"features": features})[0]
    np.testing.assert_allclose(np.array(answer.json()["outputs"]["scores"], np.float32), expected, rtol=1e-6)


def test_gs_out_to_a_bucket_that_does_not_exist_says_so_and_writes_nothing(emulator, mlp, tmp_path):
    done = run_optimize("--model", str(mlp), "--out", "gs://no-such-bucket-here/m.onnx", "--candidates", "optimized",
                        env=emulator.env)  # fmt: skip

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bucket no-such-bucket-here does not exist" in done.stderr
