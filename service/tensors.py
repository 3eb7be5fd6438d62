"""What the service knows about one of the model's tensors: its name, type and declared shape.

The bottom of the service's imports: the model store builds these from the onnxruntime session, and the codecs
(payload.py, v2.py), the OpenAPI builder and the batching scheduler read them. It imports no other service module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# onnxruntime's type strings -> numpy dtypes the service accepts and returns.
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in {
        "float": "float32", "double": "float64", "float16": "float16",
        "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
        "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
        "bool": "bool",
        "string": "object",  # onnxruntime takes and gives string tensors as numpy arrays of Python str
    }.items()
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ort_type: str
    shape: tuple[int | str | None, ...]  # ints are fixed; str/None are free (symbolic) dimensions
    dtype: np.dtype | None = field(init=False, repr=False, compare=False)  # set from ort_type (`__post_init__`)

    # Read on every request (the codecs, the cached shared-dimension plan): worked out once, not per call.
    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.name, self.ort_type, self.shape)))
        # The numpy dtype of the tensor (object for strings), None for what is not a tensor (sequences, maps): a
        # plain attribute, as `fixed`, not a property (each request reads it).
        object.__setattr__(self, "dtype", ORT_DTYPES.get(self.ort_type))
        # The fixed dimensions as (axis, size): what a request's shape is checked against.
        object.__setattr__(self, "fixed", tuple((axis, d) for axis, d in enumerate(self.shape) if isinstance(d, int)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    @classmethod
    def of(cls, arg: Any) -> TensorSpec:
        """The spec of an onnxruntime NodeArg (session.get_inputs()/get_outputs()); negative sizes are free."""
        shape = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in (arg.shape or ()))
        return cls(arg.name, arg.type, shape)

    @property
    def dtype_name(self) -> str:
        """"float32", "int64", "bool", "string", ...; onnxruntime's type for what is not a tensor."""
        dtype = self.dtype
        if dtype is None:
            return self.ort_type
        return "string" if dtype.kind == "O" else dtype.name

    def describe_shape(self) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "N") for d in self.shape) + "]"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype_name, "shape": list(self.shape)}
