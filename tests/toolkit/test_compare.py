"""`invoke model.compare`: candidates made with onnx (a re-export, a renamed output, a changed dtype, perturbed
weights, a slower model, an unreadable file, a gs:// object at a generation) against the model they would replace.
The task runs as a user runs it (a subprocess of `invoke`) for exit codes and output; the figures are read from
`compare_models` in-process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from service.model_store import TensorSpec
from tests.support import variants
from tests.support.models import ROOT, mlp_model, two_input_model
from tests.toolkit.deploy_helpers import INVOKE
from toolkit.compare import (
    CompareError,
    Thresholds,
    compare_models,
    diff_outputs,
    diff_signature,
    thresholds_from_config,
)

FAST = {"speed_seconds": 0.2}  # the speed figures are only checked for being there, not for their size


def run_compare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")} | (env or {})
    return subprocess.run([*INVOKE, "model.compare", "--speed-seconds", "0.2", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """A classifier-shaped model: features float32 [N, 16] -> scores float32 [N, 8]."""
    return mlp_model(tmp_path_factory.mktemp("baseline") / "model.onnx", widths=(16, 32, 8))


def test_an_identical_reexport_passes_every_gate_from_the_command_line(baseline, tmp_path):
    candidate = variants.reexport(baseline, tmp_path / "reexport.onnx")
    assert candidate.read_bytes() != baseline.read_bytes()

    done = run_compare("--candidate", str(candidate), "--baseline", str(baseline), "--max-abs-diff", "0",
                       "--min-agreement", "1", "--json")  # fmt: skip

    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["verdict"] == "pass" and document["failures"] == []
    assert document["signature"]["breaking"] == [] and document["signature"]["compatible"] == []
    scores = document["outputs"]["scores"]
    assert scores["max_abs_diff"] == 0 and scores["argmax_agreement"] == 1.0 and scores["requests"] == 64
    assert document["models"]["candidate"]["sha256"] != document["models"]["baseline"]["sha256"]
    for role in ("baseline", "candidate"):
        assert document["latency"]["single_row"][role]["p50_ms"] > 0
        assert document["latency"]["batch"][role]["rows_per_second"] > 0


def test_perturbed_weights_report_drift_and_fail_only_against_given_limits(baseline, tmp_path):
    candidate = variants.perturbed(baseline, tmp_path / "retrained.onnx", scale=0.3)

    free = compare_models(str(candidate), str(baseline), **FAST)
    scores = free.document["outputs"]["scores"]
    assert free.ok, free.failures
    assert scores["max_abs_diff"] > 0.01 and scores["max_rel_diff"] > 0
    assert 0 < scores["argmax_agreement"] < 1  # a retrain moves some rows' top class

    held = compare_models(str(candidate), str(baseline), thresholds=Thresholds(max_abs_diff=0.01, min_agreement=1.0),
                          **FAST)  # fmt: skip
    assert not held.ok and held.document["verdict"] == "fail"
    assert held.failures == [
        f"output 'scores': max abs diff {scores['max_abs_diff']:.4g} is over the limit 0.01 (max_abs_diff)",
        f"output 'scores': arg-max agreement {scores['argmax_agreement']:.2%} is under the limit 100.00% (min_agreement)",
    ]
    loose = compare_models(str(candidate), str(baseline), thresholds=Thresholds(max_abs_diff=1e6, min_agreement=0.0),
                           **FAST)  # fmt: skip
    assert loose.ok, loose.failures


def test_a_failed_gate_exits_1_and_names_the_figure_and_limit(baseline, tmp_path):
    candidate = variants.perturbed(baseline, tmp_path / "retrained.onnx", scale=0.3)

    done = run_compare("--candidate", str(candidate), "--baseline", str(baseline), "--max-abs-diff", "0.001")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "Signature (baseline -> candidate)" in done.stdout and "arg-max agreement" in done.stdout
    assert "FAIL: 1 gate(s) failed" in done.stdout
    assert "output 'scores': max abs diff" in done.stdout and "over the limit 0.001 (max_abs_diff)" in done.stdout


def test_thresholds_come_from_invoke_yaml_keys_too(baseline, tmp_path):
    candidate = variants.perturbed(baseline, tmp_path / "retrained.onnx", scale=0.3)

    done = run_compare("--candidate", str(candidate), "--baseline", str(baseline),
                       env={"INVOKE_RELEASE_MAX_ABS_DIFF": "0.001"})  # fmt: skip
    assert done.returncode == 1 and "over the limit 0.001 (max_abs_diff)" in done.stdout

    overridden = run_compare("--candidate", str(candidate), "--baseline", str(baseline), "--max-abs-diff", "1000",
                             env={"INVOKE_RELEASE_MAX_ABS_DIFF": "0.001"})  # fmt: skip
    assert overridden.returncode == 0, overridden.stdout


def test_thresholds_from_config_reads_the_release_block():
    from invoke import Config

    assert thresholds_from_config(Config(overrides={"release": {"max_abs_diff": "", "min_agreement": None}})) == Thresholds()
    config = Config(overrides={"release": {"max_abs_diff": "0.5", "min_agreement": 0.9, "max_latency_ratio": 2}})
    assert thresholds_from_config(config) == Thresholds(0.5, 0.9, 2.0)
    with pytest.raises(CompareError, match="release.max_abs_diff is 'lots', not a number"):
        thresholds_from_config(Config(overrides={"release": {"max_abs_diff": "lots"}}))
    with pytest.raises(CompareError, match="between 0 and 1"):
        Thresholds(min_agreement=99)


def test_a_renamed_output_is_breaking_unless_allowed(baseline, tmp_path):
    candidate = variants.renamed_output(baseline, tmp_path / "renamed.onnx", "scores", "logits")

    report = compare_models(str(candidate), str(baseline), **FAST)
    assert report.failures == [
        "breaking signature change: output 'scores' renamed to 'logits' (pass --allow-breaking to accept it)"
    ]
    assert report.document["outputs"]["scores"]["only_in"] == "baseline"
    assert "BREAKING: output 'scores' renamed to 'logits'" in report.text()

    allowed = compare_models(str(candidate), str(baseline), allow_breaking=True, **FAST)
    assert allowed.ok and allowed.document["signature"]["breaking"] == ["output 'scores' renamed to 'logits'"]


def test_a_changed_dtype_is_breaking_and_the_values_still_compared(baseline, tmp_path):
    candidate = variants.output_as_double(baseline, tmp_path / "double.onnx", "scores")

    report = compare_models(str(candidate), str(baseline), thresholds=Thresholds(max_abs_diff=1e-5), **FAST)

    assert report.failures == [
        "breaking signature change: output 'scores' dtype float32 -> float64 (pass --allow-breaking to accept it)"
    ]
    assert report.document["outputs"]["scores"]["argmax_agreement"] == 1.0


def test_an_added_output_is_compatible(baseline, tmp_path):
    candidate = variants.with_extra_output(baseline, tmp_path / "extra.onnx", "scores", "embedding")

    report = compare_models(str(candidate), str(baseline), **FAST)

    assert report.ok, report.failures
    assert report.document["signature"]["compatible"] == ["output 'embedding' added (float32 [N, 8])"]
    assert report.document["outputs"]["scores"]["max_abs_diff"] == 0


def test_signature_rules_for_dimensions_and_inputs():
    def model(inputs, outputs):
        return type("Specs", (), {"inputs": tuple(inputs), "outputs": tuple(outputs)})

    base = model([TensorSpec("x", "tensor(float)", ("N", 4)), TensorSpec("ids", "tensor(int64)", ("N", 3))],
                 [TensorSpec("y", "tensor(float)", ("N", 2)), TensorSpec("z", "tensor(float)", (1, 5))])  # fmt: skip
    new = model([TensorSpec("x", "tensor(float)", ("N", 8)), TensorSpec("ids", "tensor(int64)", ("N", "L")),
                 TensorSpec("mask", "tensor(bool)", ("N",))],
                [TensorSpec("y", "tensor(float)", ("N", 2, 1)), TensorSpec("z", "tensor(float)", ("B", 5))])  # fmt: skip

    signature = diff_signature(base, new)

    assert signature["breaking"] == [
        "input 'x' dimension 1 4 -> 8",
        "new required input 'mask' (bool [N])",
        "output 'y' rank 2 -> 3 ([N, 2] -> [N, 2, 1])",
    ]
    assert signature["compatible"] == ["input 'ids' dimension 1 3 made free (L)", "output 'z' dimension 0 1 made free (B)"]


def test_diff_outputs_on_predict_answers():
    """The figures `release` also computes on HTTP answers: numbers, strings, integers, ZipMap rows, NaN (null in
    JSON), shapes that differ and requests one side did not answer."""
    baseline = [
        {"p": [[0.1, 0.9]], "label": ["yes"], "n": [3], "zip": [{"a": 0.2, "b": 0.8}], "nan": [None]},
        {"p": [[0.7, 0.3]], "label": ["no"], "n": [4], "zip": [{"a": 0.6, "b": 0.4}], "nan": [1.0]},
        {"p": [[0.5, 0.5]], "label": ["no"], "n": [5], "zip": [{"a": 0.5, "b": 0.5}], "nan": [1.0]},
    ]
    candidate = [
        {"p": [[0.2, 0.8]], "label": ["yes"], "n": [3], "zip": [{"a": 0.3, "b": 0.7}], "nan": [None]},
        {"p": [[0.4, 0.6]], "label": ["yes"], "n": [4, 4], "zip": [{"a": 0.6, "b": 0.4}], "nan": [None]},
        None,
    ]

    figures = diff_outputs(baseline, candidate)

    assert figures["p"]["requests"] == 2 and figures["p"]["kind"] == "float"
    assert figures["p"]["max_abs_diff"] == pytest.approx(0.3) and figures["p"]["argmax_agreement"] == 0.5
    assert figures["label"] == {"requests": 2, "shape_mismatches": 0, "kind": "string", "agreement": 0.5,
                                "compared_values": 2}  # fmt: skip
    assert figures["n"]["shape_mismatches"] == 1 and figures["n"]["agreement"] == 1.0
    assert figures["zip"]["kind"] == "scores" and figures["zip"]["argmax_agreement"] == 1.0
    assert figures["zip"]["max_abs_diff"] == pytest.approx(0.1)
    assert figures["nan"]["max_abs_diff"] == "inf"  # a NaN where the baseline had a number


def test_a_slower_candidate_reports_its_ratio_and_fails_a_tiny_limit(baseline, tmp_path):
    candidate = variants.slower(baseline, tmp_path / "slower.onnx", "features", size=256, rounds=2)

    report = compare_models(str(candidate), str(baseline), thresholds=Thresholds(max_latency_ratio=0.001), **FAST)

    single = report.document["latency"]["single_row"]
    assert single["p50_ratio"] == pytest.approx(single["candidate"]["p50_ms"] / single["baseline"]["p50_ms"])
    assert report.document["latency"]["batch"]["rows_per_second_ratio"] > 0
    assert report.document["outputs"]["scores"]["max_abs_diff"] == 0  # same answers, more work
    assert any(f.startswith("latency: candidate single-row p50 ") and "over the limit 0.001x (max_latency_ratio)" in f
               for f in report.failures), report.failures  # fmt: skip
    assert "single-row p50" in report.text()


def test_an_unreadable_candidate_is_a_clear_error_with_exit_2(baseline, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")

    done = run_compare("--candidate", str(broken), "--baseline", str(baseline))

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"model.compare: the candidate {broken} cannot be served: {broken} is not a model onnxruntime can open" in done.stderr

    missing = run_compare("--candidate", str(tmp_path / "nowhere.onnx"), "--baseline", str(baseline), "--json")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert json.loads(missing.stdout)["verdict"] == "error"
    assert "is neither gs://BUCKET/OBJECT nor an existing local file" in missing.stderr


def test_a_wrong_sha256_fails_with_the_services_reason(baseline, tmp_path):
    candidate = variants.reexport(baseline, tmp_path / "reexport.onnx")

    with pytest.raises(CompareError, match="the candidate .* cannot be served: sha256 mismatch: MODEL_SHA256 is 0{64}"):
        compare_models(str(candidate), str(baseline), candidate_sha256="0" * 64, **FAST)


@pytest.mark.slow
def test_a_gs_candidate_at_a_generation_from_the_storage_emulator(emulator, baseline, tmp_path):
    candidate = variants.perturbed(baseline, tmp_path / "retrained.onnx", scale=0.3)
    generation = emulator.upload("compare-models", "iris/v2/model.onnx", candidate)
    uri = f"gs://compare-models/iris/v2/model.onnx#{generation}"

    done = run_compare("--candidate", uri, "--baseline", str(baseline), "--json", env=emulator.env)

    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["models"]["candidate"]["generation"] == generation
    assert document["outputs"]["scores"]["max_abs_diff"] > 0

    gone = run_compare("--candidate", f"gs://compare-models/iris/v2/model.onnx#{generation + 1}", "--baseline",
                       str(baseline), env=emulator.env)  # fmt: skip
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert f"#{generation + 1} does not exist (the object's generation is {generation})" in gone.stderr


def test_samples_file_requests_and_a_candidate_that_refuses_them(tmp_path):
    baseline = two_input_model(tmp_path / "two.onnx")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        json.dumps({"inputs": {"ids": [[1, 2, 3]], "scale": [[0.5]]}}) + "\n\n"
        + json.dumps({"inputs": {"ids": [[4, 5, 6], [7, 8, 9]], "scale": [[2.0], [1.0]]}}) + "\n"
    )  # fmt: skip

    same = compare_models(str(variants.reexport(baseline, tmp_path / "again.onnx")), str(baseline),
                          samples=str(samples), **FAST)  # fmt: skip
    assert same.ok and same.document["requests"]["source"] == f"2 request(s) from {samples}"
    assert same.document["outputs"]["out"]["requests"] == 2

    other = mlp_model(tmp_path / "other.onnx", widths=(3, 4, 3))
    refused = compare_models(str(other), str(baseline), samples=str(samples), allow_breaking=False, **FAST)
    assert "breaking signature change: input 'ids' removed (pass --allow-breaking to accept it)" in refused.failures
    assert any(f.startswith("the candidate refused 2 of 2 requests the baseline answered: request 1: missing input "
                            "'features'")
               for f in refused.failures), refused.failures  # fmt: skip


def test_bad_samples_fail_before_any_model_loads(baseline, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"inputs": {"features": [[0.0]]}}\nnot json\n')

    done = run_compare("--candidate", str(baseline), "--baseline", str(baseline), "--samples", str(samples))

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{samples} line 2 is not JSON" in done.stderr
    assert "comparing" in done.stdout and "Signature" not in done.stdout


def test_a_model_that_needs_real_input_is_compared_on_requests_shaped_like_the_warmup_input(tmp_path):
    from tests.support.zoo import MIN_FRAMES, min_length_model

    audio = min_length_model(tmp_path / "audio")
    candidate = variants.reexport(audio, tmp_path / "audio-again.onnx")

    blind = compare_models(str(candidate), str(audio), **FAST)
    assert blind.document["requests"]["answered"] == {"baseline": 0, "candidate": 0}
    assert len(blind.failures) == 1 and blind.failures[0].startswith("no output compared: the baseline refused all 64")
    assert "give --samples FILE or --warmup-input" in blind.failures[0]
    assert "not measured" in blind.text()

    example = json.dumps({"inputs": {"audio": [[float(i) for i in range(MIN_FRAMES + 4)]]}})
    real = compare_models(str(candidate), str(audio), warmup_input=example, **FAST)
    assert real.ok, real.failures
    assert real.document["requests"]["answered"] == {"baseline": 65, "candidate": 65}  # the example, then 64 seeded
    assert real.document["outputs"]["features"]["max_abs_diff"] == 0
    assert real.document["latency"]["single_row"]["runs"] >= 20


def test_zipmap_probabilities_compare_as_class_scores(tmp_path):
    pytest.importorskip("skl2onnx", reason="skl2onnx makes the scikit-learn models (requirements-dev.txt)")
    from tests.support.zoo import sklearn_classifier

    (tmp_path / "zipmap").mkdir()
    (tmp_path / "tensor").mkdir()
    zipmap = sklearn_classifier(tmp_path / "zipmap", zipmap=True)
    tensor = sklearn_classifier(tmp_path / "tensor", zipmap=False)

    same = compare_models(str(variants.reexport(zipmap, tmp_path / "again.onnx")), str(zipmap),
                          thresholds=Thresholds(max_abs_diff=0, min_agreement=1), **FAST)  # fmt: skip
    assert same.ok, same.failures
    probabilities = same.document["outputs"]["output_probability"]
    assert probabilities["kind"] == "scores" and probabilities["argmax_agreement"] == 1.0
    assert same.document["outputs"]["output_label"]["kind"] == "integer"

    unzipped = compare_models(str(tensor), str(zipmap), **FAST)  # skl2onnx names the outputs otherwise then
    names = [row["name"] for row in unzipped.document["signature"]["outputs"]]
    assert names == ["output_label", "output_probability", "label", "probabilities"]
    assert unzipped.failures == [
        f"breaking signature change: output {name!r} removed (pass --allow-breaking to accept it)"
        for name in ("output_label", "output_probability")
    ]
