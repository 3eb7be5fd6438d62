"""Where a prediction request is validated and turned into tensors, and outputs into JSON.

Every rejection is a `BadRequest` whose message names the input and what the model expects.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import orjson

from service.model_store import TensorSpec

EXAMPLE = '{"inputs": {"<input name>": [[...], ...]}}'
# numpy kinds a JSON value may arrive as, for each kind of tensor: bools, ints and floats.
_ACCEPTS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def decode_inputs(body: bytes, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); send {EXAMPLE}", 400) from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise BadRequest(f"request body must be a JSON object with an \"inputs\" key: {EXAMPLE}", 422)
    inputs = document["inputs"]
    names = [spec.name for spec in specs]
    if isinstance(inputs, list):
        if len(specs) != 1:
            raise BadRequest(f"a bare list is only accepted for one-input models; name each input of {names}")
        inputs = {specs[0].name: inputs}
    if not isinstance(inputs, dict):
        raise BadRequest(f"\"inputs\" must be an object mapping input names {names} to nested lists")
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise BadRequest(f"unknown input {', '.join(map(repr, unknown))}; the model's inputs are {names}")
    missing = [name for name in names if name not in inputs]
    if missing:
        raise BadRequest(f"missing input {', '.join(map(repr, missing))}; the model's inputs are {names}")
    # A body without the words true and false holds no booleans: the search costs far less than looking for them.
    may_hold_booleans = b"true" in body or b"false" in body
    tensors = {spec.name: to_tensor(inputs[spec.name], spec, may_hold_booleans=may_hold_booleans) for spec in specs}
    check_shared_dimensions(specs, tensors)
    return tensors


def check_shared_dimensions(specs: Sequence[TensorSpec], tensors: dict[str, np.ndarray]) -> None:
    """Inputs that name the same free dimension (say "batch") must agree on its size."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for symbol, size in zip(spec.shape, tensors[spec.name].shape):
            if not isinstance(symbol, str):
                continue
            first = seen.setdefault(symbol, (spec.name, size))
            if first[1] != size:
                raise BadRequest(
                    f"inputs {first[0]!r} and {spec.name!r} share dimension {symbol!r} but have sizes "
                    f"{first[1]} and {size}; give them the same number of rows"
                )


def to_tensor(value: Any, spec: TensorSpec, *, may_hold_booleans: bool = True) -> np.ndarray:
    """A JSON value (nested lists) as the input's tensor: values checked, then rank and fixed dimensions."""
    return check_shape(json_to_array(value, spec, may_hold_booleans=may_hold_booleans), spec)


def json_to_array(value: Any, spec: TensorSpec, *, may_hold_booleans: bool = True) -> np.ndarray:
    """JSON values as an array of the input's dtype; BadRequest for values the dtype cannot hold.

    `may_hold_booleans=False` lets a caller who knows the JSON has no true/false skip looking for booleans mixed
    with numbers (numpy turns [1, true] into [1, 1]).
    """
    target = spec.dtype
    if target is None:
        raise BadRequest(f"input {spec.name!r} has type {spec.ort_type}, which the service cannot accept")
    try:
        array = np.asarray(value)
    except ValueError:
        raise BadRequest(
            f"input {spec.name!r}: nested lists have uneven lengths; expected a {_expected(spec)}"
        ) from None
    if array.dtype.kind == "f" and target.kind in "iu":
        array = _whole_numbers(value, array, spec)
    if array.dtype.kind not in _ACCEPTS[target.kind]:
        found = {"U": "strings", "S": "strings", "O": "null or mixed values", "f": "non-integer numbers", "b": "booleans"}
        what = found.get(array.dtype.kind, str(array.dtype))
        raise BadRequest(f"input {spec.name!r} holds {what}; expected a {_expected(spec)}")
    if target.kind != "b" and may_hold_booleans and _holds_booleans(value):
        raise BadRequest(f"input {spec.name!r} holds booleans (true/false); expected a {_expected(spec)}")
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(f"input {spec.name!r} has values outside the {target} range [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):  # a number too large for the dtype becomes inf (JSON has none): refused below
        result = array.astype(target, copy=False)
    if target.kind == "f" and target.itemsize < array.dtype.itemsize and array.size and np.isinf(result).any():
        info = np.finfo(target)
        example = array[np.isinf(result)].flat[0].item()
        raise BadRequest(f"input {spec.name!r} holds {example}, outside the {target} range [{info.min}, {info.max}]")
    return result


def _holds_booleans(value: Any) -> bool:
    """Whether nested lists of numbers hold a true or false that numpy turned into a number."""
    if not isinstance(value, list) or not value:
        return isinstance(value, bool)
    if isinstance(value[0], list):
        if value[0] and isinstance(value[0][0], list):
            return any(_holds_booleans(row) for row in value)
        return bool in set(map(type, itertools.chain.from_iterable(value)))
    return bool in set(map(type, value))


def _whole_numbers(value: Any, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """JSON integers numpy could only hold as float64, losing digits (no integer dtype holds both -1 and 2**64 - 1),
    as the input's dtype, exactly; any other float array as it is, to be refused as non-integer."""
    items = np.asarray(value, dtype=object)
    if not all(type(item) is int for item in items.flat):
        return array
    info = np.iinfo(spec.dtype)
    if not all(info.min <= item <= info.max for item in items.flat):
        raise BadRequest(f"input {spec.name!r} has values outside the {spec.dtype} range [{info.min}, {info.max}]")
    return items.astype(spec.dtype)


def check_shape(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The array, if its rank and fixed dimensions are the input's; BadRequest naming the input otherwise."""
    if array.ndim != len(spec.shape):
        hint = "; wrap a single example in a list" if array.ndim + 1 == len(spec.shape) else ""
        raise BadRequest(
            f"input {spec.name!r} has rank {array.ndim} (shape {list(array.shape)}); "
            f"expected rank {len(spec.shape)}, shape {spec.describe_shape()}{hint}"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if isinstance(want, int) and got != want:
            raise BadRequest(
                f"input {spec.name!r} has shape {list(array.shape)}; expected {spec.describe_shape()} "
                f"(dimension {axis} must be {want})"
            )
    return array


def _expected(spec: TensorSpec) -> str:
    return f"{spec.dtype} tensor of shape {spec.describe_shape()}"


def encode_outputs(specs: Sequence[TensorSpec], values: Sequence[Any]) -> bytes:
    outputs = {spec.name: value for spec, value in zip(specs, values)}
    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    try:
        return orjson.dumps({"outputs": outputs}, option=options)
    except TypeError:  # non-contiguous arrays or numpy types orjson does not take natively
        return orjson.dumps({"outputs": {k: _plain(v) for k, v in outputs.items()}}, option=options)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
