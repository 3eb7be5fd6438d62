"""Write the bundled demo model, models/demo.onnx: a tiny iris-style classifier made with the onnx package.

Input `features`: float32 [N, 4]. Outputs `logits` float32 [N, 3] and `probabilities` float32 [N, 3].
Run `python scripts/make_demo_model.py` to regenerate it; the weights are fixed, so the file is reproducible.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS = np.array(
    [[0.42, 0.95, -1.71, -0.77], [0.53, -0.32, -0.21, -0.83], [-0.95, -0.63, 1.92, 1.60]], dtype=np.float32
).T
BIAS = np.array([0.25, 1.89, -2.14], dtype=np.float32)


def build() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "weights"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "demo-iris-classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[numpy_helper.from_array(WEIGHTS, "weights"), numpy_helper.from_array(BIAS, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-serve-demo")
    model.ir_version = 8  # readable by every onnxruntime release of the last years
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "models" / "demo.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
