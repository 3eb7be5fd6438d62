"""Real ONNX models made with the onnx package, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo.onnx"


def linear_model(path: Path, n_in: int = 4, n_out: int = 3, seed: int = 0) -> Path:
    """features float32 [N, n_in] -> scores float32 [N, n_out] (MatMul + Add)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n_in, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["scores"])],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    return _save(graph, path)


def two_input_model(path: Path) -> Path:
    """ids int64 [N, 3] and scale float32 [N, 1] -> out float32 [N, 3] = float(ids) * scale."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["idsf", "scale"], ["out"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["N", 1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
    )
    return _save(graph, path)


def large_model(path: Path, megabytes: int, n_in: int = 64, seed: int = 0) -> Path:
    """A model of about `megabytes` MB of float32 weights: features [N, n_in] -> scores [N, width]."""
    width = max(1, megabytes * 1024 * 1024 // 4 // n_in)
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n_in, width), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["scores"])],
        "large",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", width])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    return _save(graph, path)


def mlp_model(path: Path, widths: tuple[int, ...] = (256, 1024, 1024, 16), seed: int = 0) -> Path:
    """A multi-layer perceptron: features float32 [N, widths[0]] -> scores float32 [N, widths[-1]], a MatMul and Add
    per layer with Relu between layers. The default, 256 -> 1024 -> 1024 -> 16, holds about 5 MB of weights."""
    rng = np.random.default_rng(seed)
    nodes, initializers, current = [], [], "features"
    for layer, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        # He-scaled weights keep activations in range through the layers, as in a trained network.
        weights = (rng.standard_normal((n_in, n_out)) * np.sqrt(2 / n_in)).astype(np.float32)
        initializers += [numpy_helper.from_array(weights, f"w{layer}"),
                         numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{layer}")]  # fmt: skip
        last = layer == len(widths) - 2
        added = "scores" if last else f"h{layer}"
        nodes += [helper.make_node("MatMul", [current, f"w{layer}"], [f"mm{layer}"]),
                  helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [added])]  # fmt: skip
        if not last:
            nodes.append(helper.make_node("Relu", [added], [f"a{layer}"]))
            current = f"a{layer}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", widths[-1]])],
        initializer=initializers,
    )
    return _save(graph, path)


def cnn_model(path: Path, size: int = 32, channels: tuple[int, ...] = (16, 32), classes: int = 10, seed: int = 0) -> Path:
    """A small convolutional classifier: image float32 [N, 3, size, size] -> scores float32 [N, classes]: per
    channel width a 3x3 Conv (stride 2 after the first) and Relu, then global average pooling and a MatMul + Add."""
    rng = np.random.default_rng(seed)
    nodes, initializers, current, n_in = [], [], "image", 3
    for layer, n_out in enumerate(channels):
        weights = (rng.standard_normal((n_out, n_in, 3, 3)) * np.sqrt(2 / (n_in * 9))).astype(np.float32)
        initializers += [numpy_helper.from_array(weights, f"k{layer}"),
                         numpy_helper.from_array((rng.standard_normal(n_out) * 0.1).astype(np.float32), f"c{layer}")]  # fmt: skip
        stride = 1 if layer == 0 else 2
        nodes += [helper.make_node("Conv", [current, f"k{layer}", f"c{layer}"], [f"conv{layer}"], kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [f"conv{layer}"], [f"act{layer}"])]  # fmt: skip
        current, n_in = f"act{layer}", n_out
    dense = (rng.standard_normal((n_in, classes)) * np.sqrt(2 / n_in)).astype(np.float32)
    initializers += [numpy_helper.from_array(dense, "dense"), numpy_helper.from_array(np.zeros(classes, np.float32), "bias")]
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("MatMul", ["flat", "dense"], ["logits"]),
              helper.make_node("Add", ["logits", "bias"], ["scores"])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])],
        initializer=initializers,
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def reference_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What onnxruntime gives in-process for the same model and input: the expected answer."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def slow_model(path: Path, size: int = 2048, rounds: int = 5) -> Path:
    """x float32 [1, 1] -> y float32 [1, 1]; each inference multiplies `size`x`size` matrices `rounds` times,
    so a request stays in flight long enough to test shutdown. y = x * size**rounds."""
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([size, size], np.int64))),
        helper.make_node("Expand", ["x", "shape"], ["m0"]),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
    ]
    scale = np.float32(1.0 / size)
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "ones"], [f"p{i}"]))
        nodes.append(helper.make_node("Mul", [f"p{i}", "scale"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{rounds}"], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=[numpy_helper.from_array(np.array(scale), "scale")],
    )
    return _save(graph, path)


def batch_mixing_model(path: Path) -> Path:
    """x float32 [N, 4] -> y = x - mean(x over the batch): each row's answer depends on the other rows, so
    running requests together would change them (the batching self-test must find it unsafe)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "mean"], ["y"])],
        "mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return _save(graph, path)


def image_model(path: Path) -> Path:
    """image float32 [N, 3, H, W] (free height and width) -> channel_means [N, 3] and doubled [N, 3, H, W]."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["channel_means"], axes=[2, 3], keepdims=0),
            helper.make_node("Mul", ["image", "two"], ["doubled"]),
        ],
        "image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("channel_means", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 3, "H", "W"]),
        ],
        initializer=[two],
    )
    return _save(graph, path)


def lookup_model(path: Path, rows: int = 10) -> Path:
    """ids int64 [N, 1] -> vectors float32 [N, 1, 2] = table[ids]: an id outside [0, rows) passes the service's
    checks (it is a valid int64) but makes onnxruntime fail at run time."""
    table = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["N", 1, 2])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return _save(graph, path)


def busy_model(path: Path, n_in: int = 64, hidden: int = 2048, n_out: int = 4, seed: int = 0) -> Path:
    """features float32 [N, n_in] -> scores [N, n_out] through a wide hidden layer: cheap to send and to answer,
    enough work per row that a batch of rows runs in the worker's thread pool, not on its event loop."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["scores"]),
        ],
        "busy",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save(graph, path)


def scalar_input_model(path: Path) -> Path:
    """x float32 [N, 2] and a rank-0 scale float32 [] -> y = x * scale."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scalar_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    return _save(graph, path)


def dtypes_model(path: Path) -> Path:
    """One input of each kind of JSON value, each returned as it came (Identity): flag bool [N], small int8 [N, 2],
    big uint64 [2], half float16 [N], scalar float32 [] (rank 0); outputs "<input>_out"."""
    kinds = {
        "flag": (TensorProto.BOOL, ["N"]),
        "small": (TensorProto.INT8, ["N", 2]),
        "big": (TensorProto.UINT64, [2]),
        "half": (TensorProto.FLOAT16, ["N"]),
        "scalar": (TensorProto.FLOAT, []),
    }
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name in kinds],
        "dtypes",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in kinds.items()],
        [helper.make_tensor_value_info(f"{name}_out", kind, shape) for name, (kind, shape) in kinds.items()],
    )
    return _save(graph, path)


def embedding_model(folder: Path, megabytes: int, width: int = 64) -> Path:
    """ids int64 [N, 1] -> vectors float32 [N, 1, width]: a lookup in a table of about `megabytes` MB stored as
    external data beside the model (model.onnx + model.onnx.data), as exporters write large models. A lookup reads
    a few rows, so memory measures what loading costs, not the inference."""
    from onnx.external_data_helper import set_external_data

    rows = max(2, megabytes * 1024 * 1024 // 4 // width)
    table = np.random.default_rng(5).standard_normal((rows, width), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"], axis=0)],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["N", 1, width])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    del table
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_external_data(model.graph.initializer[0], "model.onnx.data")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, path)
    return path
