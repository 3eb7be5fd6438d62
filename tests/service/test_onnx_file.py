"""Large weights served from the model file itself: same answers as the model opened as is, half the memory."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.model_store import open_session
from service.onnx_file import with_weights_by_reference
from service.settings import load_settings
from tests.support.models import ROOT, large_model, linear_model, reference_outputs


def test_large_initializers_become_references_into_the_same_file(tmp_path):
    path = large_model(tmp_path / "m.onnx", 2)
    rewritten = with_weights_by_reference(path, min_bytes=1024)
    assert rewritten is not None and len(rewritten) < 1024
    model = onnx.load_from_string(rewritten)
    (weights,) = model.graph.initializer
    reference = {entry.key: entry.value for entry in weights.external_data}
    assert weights.data_location == onnx.TensorProto.EXTERNAL and reference["location"] == "m.onnx"
    offset, length = int(reference["offset"]), int(reference["length"])
    original = onnx.load(path).graph.initializer[0]
    assert path.read_bytes()[offset : offset + length] == original.raw_data

    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    session = ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"features": x})[0], reference_outputs(path, {"features": x})[0])


def test_small_initializers_and_files_that_are_not_models_are_left_alone(tmp_path):
    assert with_weights_by_reference(linear_model(tmp_path / "small.onnx"), min_bytes=1024) is None
    for content in (b"", b"this is not a protobuf", b"\xff" * 64):
        (tmp_path / "bad.onnx").write_bytes(content)
        assert with_weights_by_reference(tmp_path / "bad.onnx", min_bytes=1024) is None


@pytest.mark.slow
def test_a_large_model_opens_without_holding_its_weights_twice(tmp_path):
    path = large_model(tmp_path / "big.onnx", 96)
    script = f"""
import resource, numpy as np
from pathlib import Path
from service.model_store import open_session
from service.settings import load_settings
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
session = open_session(Path({str(path)!r}), load_settings({{"MODEL_URI": {str(path)!r}}}))
session.run(None, {{"features": np.ones((1, 64), np.float32)}})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout)  # fmt: skip
    assert grown < 1.25 * path.stat().st_size  # opened as is, onnxruntime peaks at twice the weights


def test_the_service_session_answers_like_onnxruntime_on_the_file(tmp_path):
    path = large_model(tmp_path / "big.onnx", 70)
    session = open_session(path, load_settings({"MODEL_URI": str(path)}))
    x = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"features": x})[0], reference_outputs(path, {"features": x})[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
