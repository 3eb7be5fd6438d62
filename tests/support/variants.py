"""What a retrain or a re-export does to a model, made with the onnx package from a model the tests already have:
the candidates `invoke model.compare` judges against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def reexport(source: Path, path: Path) -> Path:
    """The same graph and weights saved again under another name and producer: an identical model, other bytes."""
    model = onnx.load(source)
    model.producer_name, model.producer_version = "re-export", "2"
    return _save(model, path)


def perturbed(source: Path, path: Path, scale: float, seed: int = 1) -> Path:
    """Every float weight plus normal noise of `scale` standard deviations of that weight: a retrain's drift."""
    model = onnx.load(source)
    rng = np.random.default_rng(seed)
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            noisy = array + rng.standard_normal(array.shape) * scale * (array.std() or 1.0)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(noisy.astype(array.dtype), tensor.name))
    return _save(model, path)


def renamed_output(source: Path, path: Path, old: str, new: str) -> Path:
    """The output `old` called `new`, nothing else changed."""
    model = onnx.load(source)
    for node in model.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for output in model.graph.output:
        if output.name == old:
            output.name = new
    return _save(model, path)


def output_as_double(source: Path, path: Path, name: str) -> Path:
    """The output `name` cast to float64: same values, another dtype."""
    model = onnx.load(source)
    for node in model.graph.node:
        node.output[:] = [f"{name}_float" if out == name else out for out in node.output]
    model.graph.node.append(helper.make_node("Cast", [f"{name}_float"], [name], to=TensorProto.DOUBLE))
    for output in model.graph.output:
        if output.name == name:
            output.type.tensor_type.elem_type = TensorProto.DOUBLE
    return _save(model, path)


def with_extra_output(source: Path, path: Path, name: str, extra: str) -> Path:
    """An added output `extra`, a copy of `name`: a compatible change."""
    model = onnx.load(source)
    model.graph.node.append(helper.make_node("Identity", [name], [extra]))
    original = next(o for o in model.graph.output if o.name == name)
    added = onnx.ValueInfoProto()
    added.CopyFrom(original)
    added.name = extra
    model.graph.output.append(added)
    return _save(model, path)


def slower(source: Path, path: Path, input_name: str, size: int = 512, rounds: int = 4) -> Path:
    """The same signature and answers, plus heavy work per run: `rounds` products of `size`x`size` matrices whose
    result is multiplied by zero and added to the input (so onnxruntime cannot drop them; the input is unchanged)."""
    model = onnx.load(source)
    graph = model.graph
    renamed = f"{input_name}_given"
    for node in graph.node:
        node.input[:] = [renamed if name == input_name else name for name in node.input]
    rng = np.random.default_rng(3)
    heavy = numpy_helper.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "heavy")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero_scale")
    graph.initializer.extend([heavy, zero])
    nodes = [
        helper.make_node("ReduceSum", [input_name], ["input_sum"], keepdims=0),
        helper.make_node("Mul", ["heavy", "input_sum"], ["m0"]),  # depends on the input: not constant-folded
    ]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "heavy"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"m{rounds}"], ["heavy_sum"], keepdims=0),
        helper.make_node("Mul", ["heavy_sum", "zero_scale"], ["nothing"]),
        helper.make_node("Add", [input_name, "nothing"], [renamed]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return _save(model, path)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
