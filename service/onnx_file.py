"""Point a model's large weights back at the model file itself, so onnxruntime maps them instead of copying them.

An .onnx file is a protobuf ModelProto whose graph embeds each initializer's bytes (`raw_data`). Opened as is,
onnxruntime parses all of them into memory and then copies each into a tensor: for a moment the worker holds the
weights twice. `with_weights_by_reference` rewrites only the small parts of the file: each large initializer
loses its `raw_data` and gains ONNX's external-data fields (`location`, `offset`, `length`) naming the byte range
it already occupies in the same file, which onnxruntime then memory-maps. The weights are not read, moved or
copied, and the result is a valid ONNX model of a few kilobytes.

Only the protobuf wire format is needed to do this, not the onnx package: field numbers are those of onnx.proto.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14  # TensorProto fields
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def with_weights_by_reference(path: Path, min_bytes: int) -> bytes | None:
    """The model at `path` with every initializer of `min_bytes` or more stored as a reference into `path`.

    None when there is nothing to rewrite, or the file is not a protobuf this can walk (onnxruntime then opens
    the file itself, and reports what is wrong with it).
    """
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _rewrite(data, _MODEL_GRAPH, lambda start, end: _graph(data, start, end, path.name, min_bytes))
    except (ValueError, IndexError):  # mmap refuses an empty file; a walk refuses what is not a protobuf
        return None


def _rewrite(data: mmap.mmap | bytes, field_number: int, rewrite_field, start: int = 0, end: int | None = None):
    """The message in data[start:end] with each `field_number` field replaced by rewrite_field(its range), or
    None when no field changed."""
    out, changed = bytearray(), False
    for field, wire, field_start, value_start, field_end in _fields(data, start, len(data) if end is None else end):
        replacement = None
        if field == field_number and wire == _LENGTH_DELIMITED:
            replacement = rewrite_field(value_start, field_end)
        if replacement is None:
            out += data[field_start:field_end]
        else:
            out += _length_delimited(field_number, replacement)
            changed = True
    return bytes(out) if changed else None


def _graph(data: mmap.mmap, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    return _rewrite(data, _GRAPH_INITIALIZER, lambda s, e: _tensor(data, s, e, location, min_bytes), start, end)


def _tensor(data: mmap.mmap, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    raw = None
    for field, wire, field_start, value_start, field_end in _fields(data, start, end):
        if field in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None  # already external
        if field == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED:
            raw = field_start, value_start, field_end
    if raw is None or raw[2] - raw[1] < min_bytes:
        return None
    field_start, value_start, field_end = raw
    reference = {"location": location, "offset": str(value_start), "length": str(field_end - value_start)}
    return b"".join([
        data[start:field_start],
        data[field_end:end],
        *(_length_delimited(_TENSOR_EXTERNAL_DATA, _entry(key, value)) for key, value in reference.items()),
        _varint_bytes(_TENSOR_DATA_LOCATION << 3 | _VARINT), _varint_bytes(_EXTERNAL),
    ])  # fmt: skip


def _entry(key: str, value: str) -> bytes:
    """A StringStringEntryProto: key = 1, value = 2."""
    return _length_delimited(1, key.encode()) + _length_delimited(2, value.encode())


def _fields(data: mmap.mmap | bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field of the message in [pos, end)."""
    while pos < end:
        field_start = pos
        key, pos = _read_varint(data, pos)
        wire = key & 7
        value_start = pos
        if wire == _VARINT:
            _, pos = _read_varint(data, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _LENGTH_DELIMITED:
            length, value_start = _read_varint(data, pos)
            pos = value_start + length
        elif wire == _FIXED32:
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {field_start}")
        if pos > end:
            raise ValueError(f"protobuf field at byte {field_start} runs past its message")
        yield key >> 3, wire, field_start, value_start, pos


def _read_varint(data: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"protobuf varint too long at byte {pos}")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint_bytes(field_number << 3 | _LENGTH_DELIMITED) + _varint_bytes(len(payload)) + payload


# Where tensors may sit in a model, by message: (field number, message the field holds).
_GRAPH_NODE, _GRAPH_SPARSE_INITIALIZER = 1, 15
_NODE_ATTRIBUTE = 5
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_CONTAINS = {
    "model": {_MODEL_GRAPH: "graph"},
    "graph": {_GRAPH_INITIALIZER: "tensor", _GRAPH_SPARSE_INITIALIZER: "sparse", _GRAPH_NODE: "node"},
    "node": {_NODE_ATTRIBUTE: "attribute"},
    "attribute": {
        _ATTRIBUTE_TENSOR: "tensor", _ATTRIBUTE_TENSORS: "tensor", _ATTRIBUTE_GRAPH: "graph",
        _ATTRIBUTE_GRAPHS: "graph", _ATTRIBUTE_SPARSE_TENSOR: "sparse", _ATTRIBUTE_SPARSE_TENSORS: "sparse",
    },
    "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
}  # fmt: skip


def external_data_locations(path: Path) -> list[str]:
    """The files the model's tensors keep their data in (`location` of ONNX's external data), in order of first
    use; the weights themselves are not read."""
    locations: dict[str, None] = {}
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _collect(data, "model", 0, len(data), locations)
    except (ValueError, IndexError):  # an empty file, or not a protobuf: onnxruntime reports what is wrong with it
        return []
    return list(locations)


def _collect(data: mmap.mmap, kind: str, start: int, end: int, locations: dict[str, None]) -> None:
    for field, wire, _, value_start, field_end in _fields(data, start, end):
        if wire != _LENGTH_DELIMITED:
            continue
        if kind == "tensor":
            if field == _TENSOR_EXTERNAL_DATA:
                entry = {key: bytes(data[s:e]) for key, _, _, s, e in _fields(data, value_start, field_end)}
                if entry.get(1) == b"location" and 2 in entry:
                    locations[entry[2].decode()] = None
        elif field in _CONTAINS[kind]:
            _collect(data, _CONTAINS[kind][field], value_start, field_end, locations)
