"""Models of the kinds users bring, made at test time with onnx and skl2onnx: each with an example request and
bad requests the service must refuse naming the input."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from tests.support.models import _save


@dataclass(frozen=True)
class ZooModel:
    make: Callable[[Path], Path]  # writes the model (and any data files) into a folder; returns the .onnx path
    inputs: dict[str, Any]  # a good request's "inputs", as JSON values
    dtypes: dict[str, str]  # each input's numpy dtype, to build the same input for onnxruntime in-process
    bad: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)  # (inputs, fragments of the 4xx)
    guessed_warm_up_fails: bool = False  # zeros with free dimensions of 1 are not an input it runs on


def _train_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)


def sklearn_classifier(folder: Path, zipmap: bool) -> Path:
    """LogisticRegression via skl2onnx: label int64 [N] and probabilities, either a list of {class: p} (ZipMap,
    skl2onnx's default) or a float tensor [N, 3]."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = _train_rows()
    model = LogisticRegression(max_iter=500).fit(x, y)
    options = None if zipmap else {id(model): {"zipmap": False}}
    onx = to_onnx(model, x[:1], options=options, target_opset=17)
    path = folder / "model.onnx"
    onnx.save(onx, path)
    return path


def string_pipeline(folder: Path) -> Path:
    """One-hot encoding of a categorical string column, then a classifier with string labels: city string [N, 1]
    -> label string [N] ("yes"/"no") and probabilities as a list of {label: p}."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(1)
    cities = rng.choice(["paris", "lima", "oslo"], (80, 1))
    label = np.where((cities[:, 0] == "oslo") | (rng.random(80) > 0.8), "yes", "no")
    pipeline = Pipeline([("city", OneHotEncoder(handle_unknown="ignore")), ("classify", LogisticRegression())])
    pipeline.fit(cities, label)
    onx = to_onnx(pipeline, initial_types=[("city", StringTensorType([None, 1]))], target_opset=17)
    path = folder / "model.onnx"
    onnx.save(onx, path)
    return path


def external_data_model(folder: Path, megabytes: float = 1.0) -> Path:
    """features float32 [N, 8] -> scores [N, width], its weights in three data files beside the model, one of them
    in a subfolder: what torch.onnx.export and Optimum write for large models."""
    n_in = 8
    width = max(4, int(megabytes * 1024 * 1024 / 4 / n_in / 2))
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.standard_normal((n_in, width)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((n_in, width)).astype(np.float32), "w2")
    bias = numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w1"], ["a"]),
            helper.make_node("MatMul", ["features", "w2"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "bias"], ["scores"]),
        ],
        "external",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", width])],
        initializer=[w1, w2, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    for tensor, location in ((w1, "model.onnx.data"), (w2, "weights/w2.bin"), (bias, "model.onnx.data")):
        set_external_data(model.graph.initializer[[t.name for t in model.graph.initializer].index(tensor.name)], location)
    path = folder / "model.onnx"
    onnx.save_model(model, path)  # writes each tensor's raw_data to its location (appending), the .onnx without it
    onnx.checker.check_model(str(path))
    return path


def _graph_model(folder: Path, nodes, inputs, outputs, initializer=()) -> Path:
    return _save(helper.make_graph(nodes, "zoo", inputs, outputs, initializer=list(initializer)), folder / "model.onnx")


def float16_model(folder: Path) -> Path:
    """x float16 [N, 2] -> y = x * 2, float16."""
    two = numpy_helper.from_array(np.array(2, np.float16), "two")
    return _graph_model(
        folder, [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 2])], [two],
    )  # fmt: skip


def int8_uint8_model(folder: Path) -> Path:
    """a int8 [N, 3] and b uint8 [N, 3] -> total int16 = a + b."""
    return _graph_model(
        folder,
        [
            helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.INT16),
            helper.make_node("Cast", ["b"], ["b16"], to=TensorProto.INT16),
            helper.make_node("Add", ["a16", "b16"], ["total"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.INT8, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.UINT8, ["N", 3]),
        ],
        [helper.make_tensor_value_info("total", TensorProto.INT16, ["N", 3])],
    )


def bool_model(folder: Path) -> Path:
    """flags bool [N, 3] -> inverted bool [N, 3] and count int64 [N] of true flags."""
    return _graph_model(
        folder,
        [
            helper.make_node("Not", ["flags"], ["inverted"]),
            helper.make_node("Cast", ["flags"], ["ones"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["ones", "axis"], ["count"], keepdims=0),
        ],
        [helper.make_tensor_value_info("flags", TensorProto.BOOL, ["N", 3])],
        [
            helper.make_tensor_value_info("inverted", TensorProto.BOOL, ["N", 3]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["N"]),
        ],
        [numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )


def rank0_model(folder: Path) -> Path:
    """x float32 [N] and a scalar gain float32 [] -> y = x * gain [N]; and total float32 [] = sum(y)."""
    return _graph_model(
        folder,
        [helper.make_node("Mul", ["x", "gain"], ["y"]), helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0)],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        ],
    )


def unknown_dims_model(folder: Path) -> Path:
    """image float32 [N, 3, ?, ?] (Paddle2ONNX's names for unknown sizes) -> mean per channel [N, 3]."""
    return _graph_model(
        folder,
        [helper.make_node("ReduceMean", ["image"], ["means"], axes=[2, 3], keepdims=0)],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "?", "?"])],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["N", 3])],
    )


MIN_FRAMES = 16


def min_length_model(folder: Path) -> Path:
    """audio float32 [N, T] -> features float32 [N, 4]: the first 16 samples as 4 frames of 4, averaged, like an
    STFT front end that needs a minimum input length; fewer than 16 samples fail in Reshape."""
    return _graph_model(
        folder,
        [
            helper.make_node("Slice", ["audio", "start", "stop", "axis"], ["head"]),
            helper.make_node("Reshape", ["head", "frames"], ["framed"]),
            helper.make_node("ReduceMean", ["framed"], ["features"], axes=[2], keepdims=0),
        ],
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([MIN_FRAMES], np.int64), "stop"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
            numpy_helper.from_array(np.array([0, 4, 4], np.int64), "frames"),
        ],
    )


ROWS = [[5.1, 3.5, 1.4, 0.2], [0.3, -1.0, 2.5, 1.0]]

ZOO: dict[str, ZooModel] = {
    "sklearn-zipmap": ZooModel(
        lambda folder: sklearn_classifier(folder, zipmap=True), {"X": ROWS}, {"X": "float32"},
        [({"X": [["a", "b", "c", "d"]]}, ["'X'", "strings"]), ({"X": [[1, 2, 3]]}, ["'X'", "dimension 1 must be 4"])],
    ),
    "sklearn-no-zipmap": ZooModel(
        lambda folder: sklearn_classifier(folder, zipmap=False), {"X": ROWS}, {"X": "float32"},
        [({"X": [[1e39, 0, 0, 0]]}, ["'X'", "outside the float32 range"])],
    ),
    "string-pipeline": ZooModel(
        string_pipeline, {"city": [["oslo"], ["lima"], ["rome"]]}, {"city": "object"},
        [
            ({"city": [[3]]}, ["'city'", "numbers", "JSON strings"]),
            ({"city": [["oslo"], [None]]}, ["'city'", "null", "JSON strings"]),
            ({"city": [["oslo", "lima"]]}, ["'city'", "dimension 1 must be 1"]),
        ],
    ),
    "external-data": ZooModel(
        external_data_model, {"features": [[float(i) for i in range(8)], [0.5] * 8]}, {"features": "float32"},
        [({"features": [[1.0] * 7]}, ["'features'", "dimension 1 must be 8"])],
    ),
    "float16": ZooModel(
        float16_model, {"x": [[1.5, -2.0], [0.1, 30000.0]]}, {"x": "float16"},
        [({"x": [[70000.0, 1.0]]}, ["'x'", "70000", "outside the float16 range"])],
    ),
    "int8-uint8": ZooModel(
        int8_uint8_model, {"a": [[-128, 0, 127]], "b": [[0, 255, 7]]}, {"a": "int8", "b": "uint8"},
        [
            ({"a": [[200, 0, 0]], "b": [[0, 0, 0]]}, ["'a'", "200", "outside the int8 range"]),
            ({"a": [[0, 0, 0]], "b": [[-1, 0, 0]]}, ["'b'", "-1", "outside the uint8 range"]),
            ({"a": [[0.5, 0, 0]], "b": [[0, 0, 0]]}, ["'a'", "fraction"]),
        ],
    ),
    "bool": ZooModel(
        bool_model, {"flags": [[True, False, True], [False, False, False]]}, {"flags": "bool"},
        [({"flags": [[1, 0, 1]]}, ["'flags'", "numbers", "true/false"]), ({"flags": [["true", "x", "y"]]}, ["'flags'", "strings"])],
    ),
    "rank-0": ZooModel(
        rank0_model, {"x": [1.0, 2.0, 3.5], "gain": 2.5}, {"x": "float32", "gain": "float32"},
        [({"x": [1.0], "gain": [2.5]}, ["'gain'", "rank 1", "expected rank 0"])],
    ),
    "unknown-dims": ZooModel(
        unknown_dims_model, {"image": np.arange(2 * 3 * 4 * 6, dtype=float).reshape(2, 3, 4, 6).tolist()},
        {"image": "float32"},
        [({"image": [[[1.0, 2.0]]]}, ["'image'", "rank 3", "expected rank 4"])],
    ),
    "min-length": ZooModel(
        min_length_model, {"audio": [[float(i % 5) for i in range(20)]]}, {"audio": "float32"},
        [({"audio": [[1.0, 2.0, 3.0]]}, ["'audio'", "[1, 3]"])],  # too short: onnxruntime's refusal, named
        guessed_warm_up_fails=True,
    ),
}
