"""Where a prediction request is validated and turned into tensors, and outputs into JSON.

Every protocol's codec goes through the same functions, so a value is accepted or refused the same way on each:
`json_to_array` (JSON values to an array of the input's dtype), `check_shape` (rank and fixed dimensions),
`to_tensor` (both), `check_shared_dimensions` (dimensions the model names alike agree), `decode_inputs` (the
native /predict body) and `encode_outputs`. When onnxruntime itself
refuses an input that passed them, `rejected_by_model` turns its error into one that names the input.

Every rejection is a `BadRequest` whose message names the input, what was wrong and what the model expects.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
import sys
from typing import Any, Sequence

import numpy as np
import orjson

from service.tensors import TensorSpec

EXAMPLE = '{"inputs": {"<input name>": [[...], ...]}}'
# What an array numpy built from JSON holds, by its dtype's kind, in the words of a message.
_HOLDS = {"b": "booleans (true/false)", "i": "numbers", "u": "numbers", "f": "numbers", "U": "strings"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def decode_inputs(body: bytes, specs: Sequence[TensorSpec], *, shared_dims: bool = True) -> dict[str, np.ndarray]:
    """The native /predict body, {"inputs": {name: value}} (or a bare value for a one-input model), as tensors;
    with `shared_dims` (CHECK_SHARED_DIMS), dimensions the model names alike checked to agree."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); send {EXAMPLE}", 400) from None
    # (orjson makes plain dicts and lists: `type(...) is` says what isinstance would)
    if type(document) is not dict or "inputs" not in document:
        raise BadRequest(f"request body must be a JSON object with an \"inputs\" key: {EXAMPLE}", 422)
    inputs = document["inputs"]
    if type(inputs) is not dict:
        if type(inputs) is not list:
            raise BadRequest(f"\"inputs\" must be an object mapping input names {_names(specs)} to nested lists")
        if len(specs) != 1:
            raise BadRequest(f"a bare list is only accepted for one-input models; name each input of {_names(specs)}")
        inputs = {specs[0].name: inputs}
    if len(inputs) != len(specs):
        raise _misnamed(inputs, specs)
    try:
        values = [inputs[spec.name] for spec in specs]  # every name checked before any value is
    except KeyError:  # as many inputs as the model's, but not all of its names
        raise _misnamed(inputs, specs) from None
    tensors = {}
    # Without a true or false in the text, no value is a boolean (`_mentions_booleans`; a short body inline).
    if len(body) < _SHORT_BODY:
        may_hold_booleans = body.find(b"true") != -1 or body.find(b"false") != -1
    else:
        may_hold_booleans = _mentions_booleans(body)
    for spec, value in zip(specs, values):
        array = _plain_numbers(value, spec.dtype, may_hold_booleans, spec)  # its shape checked, if it takes it
        if array is None:
            array = _shaped(_json_to_array(value, spec, may_hold_booleans), spec)
        tensors[spec.name] = array
    if shared_dims:
        seen, plan = _last_plan  # `_shared_plan`, inline for the model's own list of inputs
        if plan if seen is specs else _shared_plan(specs):
            check_shared_dimensions(specs, tensors)
    return tensors


def _misnamed(inputs: dict, specs: Sequence[TensorSpec]) -> BadRequest:
    """The error for inputs whose names are not the model's: the unknown ones, else the missing ones."""
    names = _names(specs)
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        return BadRequest(f"unknown input {', '.join(map(repr, unknown))}; the model's inputs are {names}")
    missing = [name for name in names if name not in inputs]
    return BadRequest(f"missing input {', '.join(map(repr, missing))}; the model's inputs are {names}")


def _names(specs: Sequence[TensorSpec]) -> list[str]:
    return [spec.name for spec in specs]


def to_tensor(value: Any, spec: TensorSpec, *, may_hold_booleans: bool = True) -> np.ndarray:
    """JSON values to the input's tensor, every value and the shape checked."""
    return _shaped(json_to_array(value, spec, may_hold_booleans=may_hold_booleans), spec)


def _shaped(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """`array`, once its rank and fixed dimensions are the input's."""
    if not _fits(array.shape, spec):
        check_shape(array, spec)  # raises, naming the rank or the dimension
    return array


def _fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    """Whether a tensor of `shape` has the input's rank and fixed dimensions (free ones take any size)."""
    if len(shape) != len(spec.shape):
        return False
    for axis, size in spec.fixed:
        if shape[axis] != size:
            return False
    return True


def json_to_array(value: Any, spec: TensorSpec, *, may_hold_booleans: bool = True) -> np.ndarray:
    """JSON values (nested lists or a scalar) as an array of the input's dtype.

    Refused: values of the wrong kind (strings, null, objects, booleans where the input is not boolean, numbers
    where it is), uneven nesting, numbers with a fraction for an integer input, and numbers the dtype cannot hold
    (for floats as for integers: 1e39 would become infinity in float32). String inputs take JSON strings only.
    `may_hold_booleans=False` lets a caller who knows the JSON has no true/false skip looking for booleans mixed
    with numbers (numpy turns [1, true] into [1, 1]).
    """
    array = _plain_numbers(value, spec.dtype, may_hold_booleans)
    return array if array is not None else _json_to_array(value, spec, may_hold_booleans)


def _plain_numbers(value: Any, target: np.dtype | None, may_hold_booleans: bool = True,
                   spec: TensorSpec | None = None) -> np.ndarray | None:
    """The usual request, a small list or list of rows of JSON numbers for a float input, checked on the parsed
    JSON itself and made an array in one numpy call; None for anything else (other nesting, uneven rows, a boolean,
    a string, a number that is not well inside the dtype's range, more than PLAIN_VALUES values), which
    `_json_to_array` then decides. The same array as that path: JSON numbers are doubles or integers under 2**53,
    which a float dtype takes by the one rounding `astype` makes. `may_hold_booleans=False` (the caller knows the
    JSON has no true or false) checks every value and its range in one pass, `abs`, which only numbers (and
    booleans) take. With `spec`, also None unless the array's rank and fixed dimensions are the input's, checked on
    the lists' lengths (what `_shaped` checks on the array; the general path then says what is wrong).

    Why: on a request path that runs between two system calls, every numpy call costs several times what it costs
    in a loop (cold caches): a few C-speed passes of Python's builtins over a few values cost less than numpy's
    checks (docs/benchmarks.md, "The request path against its floor")."""
    bound = _PLAIN_BOUNDS.get(target)  # None: not a float input
    if bound is None or type(value) is not list or not value:
        return None
    values = value[0]
    if type(values) is list:  # rows
        shape: tuple[int, ...] = (len(value), len(values))
        if len(value) > 1:
            if (len(value) * len(values) > PLAIN_VALUES or set(map(type, value)) != _LIST
                    or len(set(map(len, value))) != 1):  # fmt: skip
                return None
            values = list(itertools.chain.from_iterable(value))
    else:
        shape, values = (len(value),), value
    if not values or len(values) > PLAIN_VALUES:
        return None
    if spec is not None and not _fits(shape, spec):
        return None
    if may_hold_booleans:
        if not set(map(type, values)) <= _NUMBERS or max(values) >= bound or min(values) <= -bound:
            return None
    else:
        try:
            if max(map(abs, values)) >= bound:
                return None
        except TypeError:  # a string, null, list or object among them
            return None
    return np.array(value, dtype=target)


def _json_to_array(value: Any, spec: TensorSpec, may_hold_booleans: bool) -> np.ndarray:
    """`json_to_array` for every value `_plain_numbers` does not take."""
    target = spec.dtype
    if target is None:
        raise BadRequest(f"input {spec.name!r} has type {spec.ort_type}, which the service cannot accept")
    wanted = target.kind
    if wanted == "O":
        return _strings(value, spec)
    try:
        array = np.asarray(value)
    except ValueError:
        raise _uneven(spec) from None
    kind = array.dtype.kind
    if kind == "f" and wanted == "f":  # the usual request: numbers for a float input, checked as below, sooner
        if may_hold_booleans and _holds_booleans(value):
            raise BadRequest(f"input {spec.name!r} holds booleans (true/false); expected {_expected(spec)}")
        return _to_float(array, spec, target)
    if kind == "O":
        array, kind = _beyond_numpy(array, spec), "f"
    if kind not in _HOLDS:
        raise BadRequest(f"input {spec.name!r} holds {array.dtype}; expected {_expected(spec)}")
    if target.kind == "b":
        if kind != "b":
            raise BadRequest(f"input {spec.name!r} holds {_HOLDS[kind]}; expected {_expected(spec)} of true/false")
        return array
    if kind == "b" or (may_hold_booleans and kind in "iuf" and _holds_booleans(value)):
        raise BadRequest(f"input {spec.name!r} holds booleans (true/false); expected {_expected(spec)}")
    if kind == "U":
        raise BadRequest(f"input {spec.name!r} holds strings; expected {_expected(spec)}")
    if target.kind in "iu":
        info = np.iinfo(target)
        if kind == "f":
            return _whole_numbers(value, spec, info)
        if array.size:
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise _out_of_range(spec, info.min, info.max, low if low < info.min else high)
        return array.astype(target, copy=False)
    return _to_float(array, spec, target)


def _to_float(array: np.ndarray, spec: TensorSpec, target: np.dtype) -> np.ndarray:
    """Numbers as the input's float dtype, refused if one would round to infinity in a narrower float: checked
    before the cast, which is cheaper than casting under np.errstate and looking for inf after it. The sum of
    squares (one pass, no temporary) under limit² clears every value at once; only above it are they looked at."""
    if target.itemsize < array.dtype.itemsize and array.size:
        limit = _ROUNDS_TO_INF[target.itemsize]
        checked = array if array.dtype.kind == "f" else array.astype(np.float64)  # int64 squares would wrap
        if not np.vdot(checked, checked) < limit * limit and max(checked.max(), -checked.min()) >= limit:
            info = np.finfo(target)
            raise _out_of_range(spec, float(info.min), float(info.max), array[np.abs(array) >= limit].flat[0])
    return array.astype(target, copy=False)


def check_shape(array: np.ndarray, spec: TensorSpec) -> None:
    """Rank and every fixed dimension; free dimensions (named, `?`, unnamed) take any size here."""
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


def check_shared_dimensions(specs: Sequence[TensorSpec], tensors: dict[str, np.ndarray]) -> None:
    """Dimensions the model names alike (say "N" of `feat [N, 3]` and `count [N]`) must have the same size: the
    ONNX IR says dimensions with the same `dim_param` are equal, and onnxruntime does not check it (it broadcasts
    1 row of one input over 3 of another and answers). Names exporters use for "unknown" (`?`, empty, anything
    not an identifier) are not shared. Called on each request's own tensors, before any batching (rank checked).
    CHECK_SHARED_DIMS=false skips it for a model that names dimensions alike that are not.
    """
    for symbol, places in _shared_plan(specs):
        (first, first_axis), *others = places
        size = tensors[first].shape[first_axis]
        for name, axis in others:
            other = tensors[name].shape[axis]
            if other == size:
                continue
            if name == first:
                raise BadRequest(
                    f"input {name!r} has shape {list(tensors[name].shape)}, whose dimensions {first_axis} and {axis} "
                    f"the model names both {symbol!r}: they must have the same size"
                )
            raise BadRequest(
                f"inputs {first!r} and {name!r} share dimension {symbol!r} but have sizes {size} and {other} "
                f"(shapes {list(tensors[first].shape)} and {list(tensors[name].shape)}); send them with the same "
                f"size in {symbol!r}"
            )


_last_plan: tuple[Sequence[TensorSpec] | None, tuple] = (None, ())


def _shared_plan(specs: Sequence[TensorSpec]) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """`_shared_dimensions` of `specs`, for the same sequence object (a model's inputs, made once per load) without
    even the cache's hashing: every request of a model asks with the same list."""
    global _last_plan
    seen, plan = _last_plan
    if seen is not specs:
        plan = _shared_dimensions(tuple(specs))
        _last_plan = (specs, plan)
    return plan


@functools.lru_cache(maxsize=16)
def _shared_dimensions(specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """The identifiers that name more than one dimension of the inputs, each with its (input, axis) places:
    worked out once per model, so that a request whose model shares none pays a cached lookup."""
    places: dict[str, list[tuple[str, int]]] = {}
    for spec in specs:
        for axis, symbol in enumerate(spec.shape):
            if isinstance(symbol, str) and symbol.isidentifier():
                places.setdefault(symbol, []).append((spec.name, axis))
    return tuple((symbol, tuple(where)) for symbol, where in places.items() if len(where) > 1)


def rejected_by_model(error: Exception, specs: Sequence[TensorSpec], tensors: dict[str, np.ndarray]) -> BadRequest:
    """onnxruntime's refusal of inputs that passed the checks above, as a 4xx that names the input(s)."""
    reason = _ORT_NOISE.sub("", str(error)).strip()
    try:
        check_shared_dimensions(specs, tensors)
    except BadRequest as disagreement:
        return BadRequest(f"the model rejected the input: {disagreement} (onnxruntime: {reason})")
    # onnxruntime names an input as "input: x" or "input 'x'"; a bare word could be any English "a".
    named = [spec for spec in specs if re.search(rf"\binput\W{{1,4}}{re.escape(spec.name)}(?![\w.])", reason)]
    named = named or list(specs)
    shown = ", ".join(f"{spec.name!r} of shape {list(tensors[spec.name].shape)}" for spec in named)
    return BadRequest(f"the model rejected input{'s' if len(named) > 1 else ''} {shown}: {reason}")


# "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " and the C++ source location: nothing a user can act on.
_ORT_NOISE = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : |/onnxruntime_src/\S+ (\S.*? was false\. )?")


def encode_outputs(specs: Sequence[TensorSpec], values: Sequence[Any]) -> bytes:
    """{"outputs": {name: value}}: numbers, booleans, strings, and skl2onnx's lists of {label: probability}."""
    outputs = dict(zip(map(_NAME, specs), values))
    try:  # arrays and str keys, the usual outputs: OPT_NON_STR_KEYS costs every dict a slower path
        return orjson.dumps({"outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        pass
    try:  # skl2onnx's maps keyed by class labels (numbers)
        return orjson.dumps({"outputs": outputs}, option=_ENCODE_OPTIONS)
    except TypeError:  # string (object) arrays, rank 0, non-contiguous: numpy types orjson does not take natively
        return orjson.dumps({"outputs": {k: _plain(v) for k, v in outputs.items()}}, option=_ENCODE_OPTIONS)


_ENCODE_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_NAME = operator.attrgetter("name")


def _strings(value: Any, spec: TensorSpec) -> np.ndarray:
    """String tensors: an object array of str, which onnxruntime takes for tensor(string)."""
    try:
        array = np.array(value, dtype=object)
    except ValueError:
        raise _uneven(spec) from None
    kinds = set(map(type, array.flat))
    if kinds - {str}:
        if list in kinds:
            raise _uneven(spec)
        other = sorted({_JSON_NAMES.get(kind, kind.__name__) for kind in kinds - {str}})
        raise BadRequest(f"input {spec.name!r} holds {' and '.join(other)}; expected {_expected(spec)} of JSON strings")
    return array


_JSON_NAMES = {int: "numbers", float: "numbers", bool: "booleans (true/false)", type(None): "null", dict: "objects"}


def _beyond_numpy(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """An array numpy could only build of Python objects: say which value is wrong (null, a string, a list beside
    a number), or it holds integers too large for 64 bits, kept as float64 for the range check."""
    kinds = set(map(type, array.flat))
    if list in kinds:
        raise _uneven(spec)
    if kinds <= {int, float}:
        if spec.dtype is not None and spec.dtype.kind in "iu":
            big = next(v for v in array.flat if isinstance(v, int) and not -(2**63) <= v < 2**64)
            info = np.iinfo(spec.dtype)
            raise _out_of_range(spec, info.min, info.max, big)
        try:
            return array.astype(np.float64)
        except OverflowError:
            info = np.finfo(spec.dtype)
            raise _out_of_range(spec, float(info.min), float(info.max), max(array.flat, key=abs)) from None
    other = sorted({_JSON_NAMES.get(kind, kind.__name__) for kind in kinds - {int, float}})
    raise BadRequest(f"input {spec.name!r} holds {' and '.join(other)}; expected {_expected(spec)}")


# Under this, two plain searches cost less than the hops, which pay per key that holds a u or an a (0.2 against
# 1.1 µs for a 56-byte body; 2.3 against 1.1 µs at 1.9 KB).
_SHORT_BODY = 1024


def _mentions_booleans(body: bytes) -> bool:
    """Whether the JSON text has a true or false anywhere: without, no value can be a boolean. Hopping between
    the u's (of true) and the a's (of false), letters no number has, with memchr costs ~0.01 ms for 10,000 rows,
    70 times less than `b"true" in body`, and a tenth of a microsecond for each key that holds one."""
    if len(body) < _SHORT_BODY:
        return body.find(b"true") != -1 or body.find(b"false") != -1
    for word, letter_at in ((b"true", 2), (b"false", 1)):
        letter = word[letter_at : letter_at + 1]
        at = body.find(letter, letter_at)
        while at != -1:
            if body.startswith(word, at - letter_at):
                return True
            at = body.find(letter, at + 1)
    return False


def _whole_numbers(value: Any, spec: TensorSpec, info: np.iinfo) -> np.ndarray:
    """An integer input sent numbers numpy could only hold as floats: written with a fraction part (1.0), or
    integers beside such a number or beyond int64 beside negative ones. Checked one by one on the JSON's own
    values, which Python compares exactly (as floats, 2**63 - 1 and 2**63 are one number); a rare, slower path."""
    exact = np.asarray(value, dtype=object)
    for number in exact.flat:
        if number != int(number):
            raise BadRequest(
                f"input {spec.name!r} holds numbers with a fraction (such as {number}); "
                f"expected {_expected(spec)} of whole numbers"
            )
        if not info.min <= number <= info.max:
            raise _out_of_range(spec, info.min, info.max, number)
        if isinstance(number, float) and abs(number) > _EXACT_FLOAT:
            # A float this large stands for many integers: 1e19, or an integer beyond 64 bits that the JSON
            # parser could only read as a float (-2**63 - 1 reads as -2**63). Which one was meant is lost.
            raise BadRequest(
                f"input {spec.name!r} holds {number!r}, a number too large to be read exactly as a whole number; "
                f"write it as an integer (no fraction or exponent) within the {spec.dtype_name} range "
                f"[{info.min}, {info.max}]"
            )
    return exact.astype(spec.dtype)


# The smallest magnitude that rounds to infinity when cast to float32 / float16 (half-way past the largest finite
# value: 2**128 - 2**103 and 65520).
_ROUNDS_TO_INF = {4: float(2**128 - 2**103), 2: 65520.0}
_EXACT_FLOAT = 2**53  # floats up to this are whole numbers exactly; beyond it they stand for several
# `_plain_numbers`: at most this many values (above it numpy's vectorized checks cost less), and numbers under
# a bound: for float32, 2**53 (an integer beyond it might round differently going straight to float32 than through
# float64, as the general path does); for float16, where it rounds to infinity; for float64, its largest value.
PLAIN_VALUES = 64
_PLAIN_BOUNDS = {np.dtype(np.float64): sys.float_info.max, np.dtype(np.float32): float(_EXACT_FLOAT),
                 np.dtype(np.float16): _ROUNDS_TO_INF[2]}  # fmt: skip
_NUMBERS = frozenset((float, int))  # bool is neither: type(True) is bool
_LIST = {list}


def _holds_booleans(value: Any) -> bool:
    """Whether nested lists of numbers hold a true or false that numpy turned into a number."""
    if not isinstance(value, list) or not value:
        return isinstance(value, bool)
    if isinstance(value[0], list):
        if value[0] and isinstance(value[0][0], list):
            return any(_holds_booleans(row) for row in value)
        return bool in set(map(type, itertools.chain.from_iterable(value)))
    return bool in set(map(type, value))


def _out_of_range(spec: TensorSpec, low: Any, high: Any, example: Any) -> BadRequest:
    return BadRequest(
        f"input {spec.name!r} holds {_plain(example)}, outside the {spec.dtype_name} range [{low}, {high}]; "
        f"send values the model's {spec.dtype_name} input can hold"
    )


def _uneven(spec: TensorSpec) -> BadRequest:
    return BadRequest(f"input {spec.name!r}: nested lists have uneven lengths; expected {_expected(spec)}")


def _expected(spec: TensorSpec) -> str:
    article = "an" if spec.dtype_name[0] in "aeiou" else "a"
    return f"{article} {spec.dtype_name} tensor of shape {spec.describe_shape()}"


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
