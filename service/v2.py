"""The Open Inference Protocol (KServe V2 / Triton HTTP) as a codec: request bodies to tensors, outputs to answers.

JSON and the binary tensor data extension, both ways. A binary request is a JSON header of
`Inference-Header-Content-Length` bytes followed by each input that declares `binary_data_size`, in the order
of the header's inputs, little-endian and row-major (BOOL one byte, BYTES as a uint32 length then the bytes).
Validation of each tensor against the model is payload.py's, shared with /predict; nothing here runs the model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import orjson

from service.tensors import TensorSpec
from service.payload import BadRequest, check_shape, check_shared_dimensions, json_to_array

PLATFORM = "onnx_onnxv1"
EXTENSIONS = ["binary_tensor_data"]

# Protocol datatype <-> numpy dtype (BYTES: object arrays of str/bytes, what onnxruntime takes for strings).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype("uint8"), "UINT16": np.dtype("uint16"), "UINT32": np.dtype("uint32"), "UINT64": np.dtype("uint64"),
    "INT8": np.dtype("int8"), "INT16": np.dtype("int16"), "INT32": np.dtype("int32"), "INT64": np.dtype("int64"),
    "FP16": np.dtype("float16"), "FP32": np.dtype("float32"), "FP64": np.dtype("float64"),
}  # fmt: skip
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}
EXAMPLE = '{"inputs": [{"name": "<input>", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}'


def datatype(spec: TensorSpec) -> str:
    """The protocol's name for a tensor spec's type: FP32, INT64, BYTES, ..."""
    if spec.ort_type == "tensor(string)":
        return "BYTES"
    dtype = spec.dtype
    if dtype is not None and dtype in _BY_DTYPE:
        return _BY_DTYPE[dtype]
    return spec.ort_type  # a sequence or map output: described as onnxruntime names it


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype(spec), "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}


@dataclass
class InferRequest:
    feeds: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None  # requested output names, in order; None: all
    binary: dict[str, bool] = field(default_factory=dict)  # output name -> answer in binary
    binary_default: bool = False  # binary_data_output: the request-wide default for outputs


def decode_request(
    body: bytes, header_length: str | None, specs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
    *, shared_dims: bool = True,
) -> InferRequest:
    """An infer request body (JSON, or JSON header + binary tensors) as validated feeds; BadRequest otherwise.
    `shared_dims` (CHECK_SHARED_DIMS): dimensions the model names alike must agree (payload.py)."""
    header, binary = _split(body, header_length)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); send {EXAMPLE}", 400) from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise BadRequest(f"request body must be a JSON object with an \"inputs\" list: {EXAMPLE}", 400)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("\"id\" must be a string", 400)
    parameters = _parameters(document, "request")
    by_name = {spec.name: spec for spec in specs}
    names = list(by_name)
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in document["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise BadRequest(f"each of \"inputs\" must be an object with a \"name\"; the model's inputs are {names}", 400)
        name = tensor["name"]
        spec = by_name.get(name)
        if spec is None:
            raise BadRequest(f"unknown input {name!r}; the model's inputs are {names}", 400)
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice", 400)
        shape = _shape(tensor, name)
        declared = tensor.get("datatype")
        expected = datatype(spec)
        if declared != expected:
            raise BadRequest(f"input {name!r} has datatype {declared!r}; the model expects {expected}", 400)
        size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer", 400)
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name!r} declares {size} bytes of binary data but only {len(binary) - offset} follow "
                    "the JSON header (check Inference-Header-Content-Length)", 400)  # fmt: skip
            array = _from_binary(binary[offset : offset + size], shape, spec, expected)
            offset += size
        elif "data" in tensor:
            array = _from_json(tensor["data"], shape, spec)
        else:
            raise BadRequest(f"input {name!r} has neither \"data\" nor a binary_data_size parameter", 400)
        feeds[name] = array
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data follow the inputs that declare them", 400)
    missing = [name for name in names if name not in feeds]
    if missing:
        raise BadRequest(f"missing input {', '.join(map(repr, missing))}; the model's inputs are {names}", 400)
    if shared_dims:
        check_shared_dimensions(specs, feeds)
    request = InferRequest(feeds, request_id, binary_default=_flag(parameters, "binary_data_output", "request"))
    if document.get("outputs") is not None:
        _requested_outputs(document["outputs"], outputs, request)
    return request


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit():
        raise BadRequest(f"Inference-Header-Content-Length must be a byte count, not {header_length!r}", 400)
    length = int(header_length)
    if length == 0:
        raise BadRequest("Inference-Header-Content-Length 0 (a raw, headerless tensor) is not supported: "
                         "send the JSON header first", 400)  # fmt: skip
    if length > len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes", 400)
    return body[:length], body[length:]


def _parameters(document: dict, where: str) -> dict:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: \"parameters\" must be an object", 400)
    return parameters


def _flag(parameters: dict, key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: parameter {key!r} must be true or false", 400)
    return value


def _shape(tensor: dict, name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: \"shape\" must be a list of non-negative integers, e.g. [1, 4]", 400)
    return tuple(shape)


def _from_json(data: Any, shape: tuple[int, ...], spec: TensorSpec) -> np.ndarray:
    """JSON data (flat row-major, or nested) of the declared shape, validated by the /predict rules."""
    count = int(np.prod(shape))
    if not isinstance(data, list):
        data = [data]
    flat = json_to_array(data, spec).reshape(-1) if data else np.empty(0, dtype=spec.dtype or object)
    if flat.size != count:
        raise BadRequest(f"input {spec.name!r} has {flat.size} values but shape {list(shape)} needs {count}", 400)
    array = flat.reshape(shape)
    check_shape(array, spec)
    return array


def _from_binary(raw: bytes, shape: tuple[int, ...], spec: TensorSpec, name: str) -> np.ndarray:
    count = int(np.prod(shape))
    if name == "BYTES":
        array = np.empty(count, dtype=object)
        position = 0
        for index in range(count):
            if position + 4 > len(raw):
                raise BadRequest(f"input {spec.name!r}: binary BYTES data ends after {index} of {count} elements", 400)
            (length,) = struct.unpack_from("<I", raw, position)
            position += 4
            if position + length > len(raw):
                raise BadRequest(f"input {spec.name!r}: binary BYTES element {index} runs past its data", 400)
            array[index] = raw[position : position + length].decode("utf-8", errors="replace")
            position += length
        if position != len(raw):
            raise BadRequest(f"input {spec.name!r}: {len(raw) - position} bytes after its {count} BYTES elements", 400)
    else:
        dtype = DATATYPES[name]
        if len(raw) != count * dtype.itemsize:
            raise BadRequest(
                f"input {spec.name!r}: shape {list(shape)} of {name} needs {count * dtype.itemsize} bytes, "
                f"binary_data_size is {len(raw)}", 400)  # fmt: skip
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        if dtype.kind == "b" and array.size and raw.translate(None, b"\x00\x01"):
            raise BadRequest(f"input {spec.name!r}: BOOL bytes must be 0 or 1", 400)
    array = array.reshape(shape)
    check_shape(array, spec)
    return array


def _requested_outputs(requested: Any, outputs: Sequence[TensorSpec], request: InferRequest) -> None:
    names = [spec.name for spec in outputs]
    if not isinstance(requested, list):
        raise BadRequest(f"\"outputs\" must be a list of {{\"name\": ...}} objects naming some of {names}", 400)
    chosen = []
    for entry in requested:
        if not isinstance(entry, dict) or entry.get("name") not in names:
            given = entry.get("name") if isinstance(entry, dict) else entry
            raise BadRequest(f"unknown output {given!r}; the model's outputs are {names}", 400)
        parameters = _parameters(entry, f"output {entry['name']!r}")
        if "binary_data" in parameters:
            request.binary[entry["name"]] = _flag(parameters, "binary_data", f"output {entry['name']!r}")
        chosen.append(entry["name"])
    request.outputs = chosen


def encode_response(
    request: InferRequest, specs: Sequence[TensorSpec], values: Sequence[Any], model_name: str, version: str | None
) -> tuple[bytes, int | None]:
    """(body, JSON header length when the body carries binary outputs, else None)."""
    by_name = dict(zip((spec.name for spec in specs), zip(specs, values)))
    names = request.outputs if request.outputs is not None else [spec.name for spec in specs]
    tensors, blobs = [], []
    for name in names:
        spec, value = by_name[name]
        tensor, array = _output(spec, value)
        if request.binary.get(name, request.binary_default):
            blob = _to_binary(array, tensor["datatype"])
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = array.reshape(-1)
            tensor["data"] = flat.tolist() if flat.dtype.kind == "O" else flat
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": model_name}
    if version is not None:
        answer["model_version"] = version
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = tensors
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _output(spec: TensorSpec, value: Any) -> tuple[dict[str, Any], np.ndarray]:
    if isinstance(value, np.ndarray) and value.dtype in _BY_DTYPE:
        return {"name": spec.name, "datatype": _BY_DTYPE[value.dtype], "shape": list(value.shape)}, np.ascontiguousarray(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        strings = np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)], dtype=object)
        return {"name": spec.name, "datatype": "BYTES", "shape": list(value.shape)}, strings.reshape(value.shape)
    # A sequence or map (skl2onnx's ZipMap probabilities): one JSON document per element, as BYTES.
    items = list(value) if isinstance(value, list) else [value]
    encoded = np.array(
        [orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode() for item in items],
        dtype=object,
    )
    return {"name": spec.name, "datatype": "BYTES", "shape": [len(items)]}, encoded


def _to_binary(array: np.ndarray, name: str) -> bytes:
    if name == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
