"""The service's OpenAPI document (/openapi.json) and Swagger UI (/docs), typed from the model being served.

FastAPI describes the routes it serves (/health, /metadata, the V2 GET routes) from their signatures, which say
nothing about their answers or the model; POST /predict and the V2 infer routes bypass FastAPI (app.py,
`InferenceApp`). So the document is FastAPI's list of routes with every answer described here and the inference
routes added, their tensors typed from the model's inputs and outputs: each dtype's JSON type and range (what
payload.py enforces), nesting as deep as the rank, fixed dimensions as minItems/maxItems.

Until the load ends the document says what it can (any tensor) and is built again for each request; once the
model is ready (or failed for good) it is built once and kept.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from service import auth, open_inference, v2
from service.model_store import LoadState, ModelStore
from service.tensors import TensorSpec
from service.settings import Settings

Schema = dict[str, Any]
DOCS_FILES = auth.DOCS_FILES.rstrip("/")  # where Swagger UI's files are served


def install(api: FastAPI, store: ModelStore, settings: Settings) -> None:
    """Serve the typed document at /openapi.json, and Swagger UI at /docs unless DOCS=false."""

    def openapi() -> Schema:
        if api.openapi_schema is None:
            document = build(api, store, settings)
            if store.status.state is LoadState.LOADING:
                return document
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's /openapi.json route calls api.openapi()
    if settings.docs:
        # Swagger UI's own files, from a pinned package (fastapi-offline), served here: no CDN, so /docs works
        # in a private network or behind a strict proxy.
        api.mount(DOCS_FILES, StaticFiles(directory=str(importlib.resources.files("fastapi_offline") / "static")))

        async def docs(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(
                openapi_url=root + (api.openapi_url or "/openapi.json"), title=f"{api.title} - docs",
                swagger_js_url=f"{root}{DOCS_FILES}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{DOCS_FILES}/swagger-ui.css",
                swagger_favicon_url=f"{root}{DOCS_FILES}/favicon.png",
            )  # fmt: skip

        api.add_route("/docs", docs, methods=["GET"], include_in_schema=False)


def build(api: FastAPI, store: ModelStore, settings: Settings) -> Schema:
    ready = store.ready
    inputs, outputs = (store.inputs, store.outputs) if ready else ((), ())
    served = settings.served_name
    version = (open_inference.model_version(store) or "1") if ready else None
    document = get_openapi(
        title=api.title,
        version=open_inference.SERVER_VERSION,
        description=f"Serves the ONNX model `{served}`. "
        + ("Tensors are typed from the loaded model." if ready else "The model is not loaded yet: tensors are untyped."),
        routes=api.routes,
    )
    paths = document.setdefault("paths", {})
    paths["/predict"] = {"post": predict_operation(inputs, outputs, ready)}
    for path, methods in route_operations(inputs, outputs, ready, served, version).items():
        for method, operation in methods.items():  # FastAPI's own (operationId, summary, tags) kept, answers replaced
            paths.setdefault(path, {}).setdefault(method, {}).update(operation)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(COMPONENTS)
    if settings.api_key_list:
        _require_keys(document, settings.docs)
    _drop_unreferenced(document)  # FastAPI's HTTPValidationError: none of these routes answers with it
    return document


def _require_keys(document: Schema, docs_open: bool) -> None:
    """API_KEYS set: both ways of sending a key declared, so that Swagger UI's "Authorize" sends it, and every
    operation but the open ones (service/auth.py) requires one and may answer 401."""
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "one of the service's API_KEYS"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "one of the service's "
                   "API_KEYS; use it where Authorization carries something else (Cloud Run's IAM identity token)"},
    }  # fmt: skip
    document["security"] = [{"bearer": []}, {"apiKey": []}]
    open_paths = auth.open_paths(docs_open)
    for path, methods in document["paths"].items():
        for operation in methods.values():
            if path in open_paths:
                operation["security"] = []
            else:
                body = ERROR if path == "/v2" or path.startswith("/v2/") else DETAIL
                unauthorized = _json("No API key, or not one of the service's", body)
                unauthorized["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
                operation.setdefault("responses", {})["401"] = unauthorized


def _drop_unreferenced(document: Schema) -> None:
    schemas = document["components"]["schemas"]
    while True:
        used = json.dumps([document["paths"], schemas])
        unused = [name for name in schemas if f'"#/components/schemas/{name}"' not in used]
        if not unused:
            return
        for name in unused:
            del schemas[name]


# --- values and tensors ---------------------------------------------------------------------------------------


def value_schema(spec: TensorSpec, *, output: bool = False) -> Schema:
    """One element of the tensor in JSON: type and the range the dtype can hold (what payload.py accepts)."""
    if spec.ort_type == "tensor(string)":
        return {"type": "string"}
    dtype = spec.dtype
    if dtype is None:  # a sequence or map output (skl2onnx's ZipMap): JSON as onnxruntime gives it
        return {"description": f"onnxruntime type {spec.ort_type}, as JSON"}
    if dtype.kind == "b":
        return {"type": "boolean"}
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return {"type": "integer", "format": dtype.name, "minimum": int(info.min), "maximum": int(info.max)}
    number_format = {"float32": "float", "float64": "double"}.get(dtype.name, dtype.name)  # OpenAPI's names
    if output:  # inf and NaN have no JSON form: the answer holds null for them
        return {"type": ["number", "null"], "format": number_format, "description": "null stands for inf or NaN"}
    if dtype.itemsize == 8:
        return {"type": "number", "format": number_format}
    # payload.py refuses what would become inf: beyond the largest value by half a step (it rounds to inf).
    info = np.finfo(dtype)
    bound = float(info.max) + 2.0 ** (info.maxexp - 2 - info.nmant)
    return {"type": "number", "format": number_format, "exclusiveMinimum": -bound, "exclusiveMaximum": bound,
            "description": f"largest magnitude {float(info.max)}"}  # fmt: skip


def nested_schema(spec: TensorSpec, *, output: bool = False) -> Schema:
    """Nested lists as deep as the rank; a fixed dimension is exactly that many items."""
    schema = value_schema(spec, output=output)
    if not _is_tensor(spec) or not spec.shape:
        return schema
    for axis in reversed(range(len(spec.shape))):
        size = spec.shape[axis]
        schema = {"type": "array", "items": schema}
        if isinstance(size, int):
            schema["minItems"] = schema["maxItems"] = size
        elif axis < len(spec.shape) - 1 and not output:
            schema["minItems"] = 1  # an empty list cannot show the levels below it: [] is read as rank 1
    schema["description"] = f"{_dtype_name(spec)}, shape {spec.describe_shape()}"
    return schema


def _is_tensor(spec: TensorSpec) -> bool:
    return spec.ort_type.startswith("tensor(")  # not a sequence or map


def _dtype_name(spec: TensorSpec) -> str:
    if spec.ort_type == "tensor(string)":
        return "string"
    return spec.dtype.name if spec.dtype is not None else spec.ort_type


def _example_shape(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else 1 for d in spec.shape]


def _zero(spec: TensorSpec) -> Any:
    if spec.ort_type == "tensor(string)":
        return ""
    return False if spec.dtype is not None and spec.dtype.kind == "b" else 0


def example_value(spec: TensorSpec) -> Any:
    """Zeros of the input's shape, one row for each free dimension: a request that passes validation."""
    value = _zero(spec)
    for size in reversed(_example_shape(spec)):
        value = [value] * size
    return value


ANY_TENSOR: Schema = {
    "description": "nested lists of the tensor's values (the model is not loaded yet: see /metadata once it is)",
    "anyOf": [{"type": "array"}, {"type": "number"}, {"type": "boolean"}, {"type": "string"}],
}


# --- POST /predict --------------------------------------------------------------------------------------------


def predict_operation(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], ready: bool) -> Schema:
    if ready:
        names = [spec.name for spec in inputs]
        by_name: Schema = {
            "type": "object",
            "properties": {spec.name: nested_schema(spec) for spec in inputs},
            "required": names,
            "additionalProperties": False,
        }
        given = by_name
        if len(inputs) == 1 and inputs[0].shape:
            given = {"anyOf": [by_name, nested_schema(inputs[0])], "description": "one input's tensor may come bare"}
        answer: Schema = {
            "type": "object",
            "properties": {spec.name: nested_schema(spec, output=True) for spec in outputs},
            "required": [spec.name for spec in outputs],
            "additionalProperties": False,
        }
        example: Schema = {"inputs": {spec.name: example_value(spec) for spec in inputs}}
    else:
        given = {"type": "object", "additionalProperties": ANY_TENSOR}
        answer = {"type": "object", "additionalProperties": ANY_TENSOR}
        example = {"inputs": {"<input name>": [[0.0]]}}
    body = {"type": "object", "required": ["inputs"], "properties": {"inputs": given}}
    outputs_body = {"type": "object", "required": ["outputs"], "properties": {"outputs": answer}}
    return {
        "operationId": "predict",
        "summary": "Run the model",
        "description": "Body `{\"inputs\": {name: nested lists}}`; the answer `{\"outputs\": {name: nested lists}}`.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": body, "example": example}}},
        "responses": {
            "200": _json("The model's outputs", outputs_body),
            "400": _json("The body is not valid JSON", DETAIL),
            "413": _json("The body is over MAX_BODY_BYTES", DETAIL),
            "422": _json("An input is missing, unknown, or of the wrong type, range or shape; the detail names it", DETAIL),
            "503": _refused(DETAIL),
        },
    }


# --- Open Inference Protocol (V2) -----------------------------------------------------------------------------

V2_BINARY_NOTE = (
    "The binary tensor data extension is accepted too: the body is the JSON request followed by the bytes of "
    "each input that declares `parameters.binary_data_size` (little-endian, row-major; BYTES as a uint32 length "
    "then the bytes), and the header `Inference-Header-Content-Length` gives the JSON part's length. Outputs "
    "asked for with `binary_data` (or `parameters.binary_data_output`) come back the same way, as "
    "application/octet-stream."
)


def route_operations(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], ready: bool, served: str, version: str | None
) -> dict[str, Schema]:
    name = _path_parameter("name", {"type": "string", "enum": [served]}, "the served model's name")
    versioned = [name, _path_parameter("version", {"type": "string", **({"enum": [version]} if version else {})},
                                       "the model's version: its Cloud Storage generation, else 1")]  # fmt: skip
    infer = v2_infer_operation(inputs, outputs, ready, served)
    metadata = {
        "200": _json("The model's metadata", _ref("V2ModelMetadata")),
        "404": _json("No such model or version", ERROR),
        "503": _json("The model is not loaded (yet)", ERROR),
    }
    model_ready = {
        "200": _json("The model is ready", _ref("V2ModelReady")),
        "404": _json("No such model or version", ERROR),
        "503": _json("The model is not loaded (yet)", _ref("V2ModelReady")),
    }
    operations: dict[str, Schema] = {
        "/v2/models/{name}/infer": {
            "post": {**infer, "operationId": "v2_infer", "parameters": [name, *infer["parameters"]]}
        },
        "/v2/models/{name}/versions/{version}/infer": {
            "post": {**infer, "operationId": "v2_infer_version", "parameters": [*versioned, *infer["parameters"]]}
        },
    }
    for path, parameters in [("/v2/models/{name}", [name]), ("/v2/models/{name}/versions/{version}", versioned)]:
        operations[path] = {"get": {"parameters": parameters, "responses": metadata}}
        operations[path + "/ready"] = {"get": {"parameters": parameters, "responses": model_ready}}
    operations["/v2"] = {"get": {"responses": {"200": _json("The server's metadata", _ref("V2ServerMetadata"))}}}
    operations["/v2/health/live"] = {"get": {"responses": {"200": _json("The server is live", _ref("V2Live"))}}}
    operations["/v2/health/ready"] = {"get": {"responses": {
        "200": _json("The model is loaded", _ref("V2Ready")),
        "503": _json("The model is not loaded (yet)", _ref("V2Ready")),
    }}}  # fmt: skip
    operations["/health"] = {"get": {"responses": {
        "200": _json("The model is loaded", _ref("Health")),
        "503": _json("The model is loading, or failed to load", _ref("Health")),
    }}}  # fmt: skip
    operations["/metadata"] = {"get": {"responses": {
        "200": _json("The model's inputs and outputs", _ref("Metadata")),
        "503": _refused(DETAIL),
    }}}  # fmt: skip
    return operations


def v2_infer_operation(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], ready: bool, served: str) -> Schema:
    if ready:
        tensors: Schema = {
            **_tuple([v2_input_schema(spec) for spec in inputs]),
            "description": "every input of the model once: in the model's order here, the service takes any order",
        }
        wanted: Schema = {"enum": [spec.name for spec in outputs]}
        answered: Schema = {"anyOf": [v2_output_schema(spec) for spec in outputs]} if outputs else {}
        example = {"inputs": [v2_example(spec) for spec in inputs]}
    else:
        tensors = {"type": "array", "items": _ref("V2Tensor")}
        wanted, answered = {"type": "string"}, _ref("V2Tensor")
        example = {"inputs": [{"name": "<input name>", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}
    request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "comes back in the answer"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": tensors,
            "outputs": {
                "type": "array",
                "description": "the outputs to answer with (default: all)",
                "items": {"type": "object", "required": ["name"], "properties": {
                    "name": wanted,
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                }},  # fmt: skip
            },
        },
    }
    answer = {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string", "enum": [served]},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": answered},
        },
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "summary": "Run the model (Open Inference Protocol)",
        "description": "The JSON form: each input as `{name, shape, datatype, data}` with `data` flat and row-major. "
        + V2_BINARY_NOTE,
        "parameters": [{
            "name": "Inference-Header-Content-Length", "in": "header", "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "binary tensor data extension: the length of the JSON part of the body",
        }],  # fmt: skip
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request, "example": example}, "application/octet-stream": binary},
        },
        "responses": {
            "200": {
                "description": "The model's outputs",
                "headers": {"Inference-Header-Content-Length": {
                    "description": "with binary outputs: the length of the JSON part", "schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": answer}, "application/octet-stream": binary},
            },  # fmt: skip
            "400": _json("Bad input: the error names the input and what the model expects", ERROR),
            "404": _json("No such model or version", ERROR),
            "413": _json("The body is over MAX_BODY_BYTES", ERROR),
            "503": _refused(ERROR),
        },
    }


def _v2_shape(spec: TensorSpec) -> Schema:
    dims = [{"const": d} if isinstance(d, int) else {"type": "integer", "minimum": 0} for d in spec.shape]
    return _tuple(dims)


def _tuple(items: list[Schema]) -> Schema:
    """An array of exactly these items, in order (prefixItems may not be empty)."""
    if not items:
        return {"type": "array", "maxItems": 0}
    return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}


def _v2_datatype(spec: TensorSpec) -> str:
    name = v2.datatype(spec)
    return name if name in v2.DATATYPES or name == "BYTES" else "BYTES"  # non-tensors are answered as JSON strings


def v2_input_schema(spec: TensorSpec) -> Schema:
    data: Schema = {"type": "array", "items": value_schema(spec), "description": "flat, row-major"}
    if all(isinstance(d, int) for d in spec.shape):
        data["minItems"] = data["maxItems"] = int(np.prod(spec.shape, dtype=np.int64))
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": spec.name},
            "shape": _v2_shape(spec),
            "datatype": {"enum": [_v2_datatype(spec)]},
            "data": data,
            "parameters": {"type": "object", "properties": {"binary_data_size": {
                "type": "integer", "minimum": 0, "description": "binary extension: this input's bytes after the JSON"}}},
        },  # fmt: skip
    }


def v2_output_schema(spec: TensorSpec) -> Schema:
    tensor = _is_tensor(spec)
    rank = {"minItems": len(spec.shape), "maxItems": len(spec.shape), "description": spec.describe_shape()}
    return {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"const": spec.name},
            "datatype": {"enum": [_v2_datatype(spec)]},
            # Not prefixItems as in requests: schemathesis 4.32 rewrites them into a form its response check refuses.
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, **(rank if tensor else {})},
            "data": {"type": "array", "items": value_schema(spec, output=True) if tensor else {"type": "string"}},
            "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        },
    }


def v2_example(spec: TensorSpec) -> Schema:
    shape = _example_shape(spec)
    return {"name": spec.name, "shape": shape, "datatype": _v2_datatype(spec), "data": [_zero(spec)] * int(np.prod(shape))}


# --- shared pieces --------------------------------------------------------------------------------------------


def _ref(component: str) -> Schema:
    return {"$ref": f"#/components/schemas/{component}"}


def _path_parameter(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _refused(body: Schema) -> Schema:
    return {
        **_json("The model is still loading, or failed to load", body),
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
    }


DETAIL: Schema = _ref("Detail")
ERROR: Schema = _ref("Error")
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_V2_TENSOR_METADATA: Schema = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
_TENSOR_METADATA: Schema = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "dtype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": ["integer", "string", "null"]}, "description": "ints are fixed"},
    },
}
COMPONENTS: dict[str, Schema] = {
    "Detail": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Batching": {
        "type": "object",
        "required": ["enabled", "reason"],
        "properties": {
            "enabled": {"type": "boolean"},
            "reason": {"type": "string"},
            "max_batch_rows": {"type": "integer"},
            "max_batch_delay_ms": {"type": "number"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "model_loaded", "step", "model", "load_seconds", "error"],
        "properties": {
            "status": {"enum": ["loading", "ready", "failed"]},
            "model_loaded": {"type": "boolean"},
            "step": {"type": "string"},
            "model": {"type": "object", "required": ["uri"], "properties": {
                "uri": {"type": "string"},
                "generation": {"type": ["integer", "null"]},
                "sha256": _NULLABLE_STRING,
                "size_bytes": {"type": ["integer", "null"]},
            }},  # fmt: skip
            "load_seconds": {"type": "number"},
            "error": {**_NULLABLE_STRING, "description": "why the load failed"},
            "batching": _ref("Batching"),
        },
    },
    "Metadata": {
        "type": "object",
        "required": ["model", "inputs", "outputs"],
        "properties": {
            "model": {"type": "object", "required": ["uri"], "properties": {
                "uri": {"type": "string"}, "generation": {"type": ["integer", "null"]}, "sha256": _NULLABLE_STRING}},
            "inputs": {"type": "array", "items": _TENSOR_METADATA},
            "outputs": {"type": "array", "items": _TENSOR_METADATA},
            "batching": _ref("Batching"),
        },  # fmt: skip
    },
    "V2Tensor": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"enum": [*v2.DATATYPES, "BYTES"]},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    },
    "V2ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "V2Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "V2Ready": {
        "type": "object",
        "required": ["ready"],
        "properties": {"ready": {"type": "boolean"}, "error": {"type": "string"}},
    },
    "V2ModelReady": {
        "type": "object",
        "required": ["ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}, "error": {"type": "string"}},
    },
    "V2ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _V2_TENSOR_METADATA},
            "outputs": {"type": "array", "items": _V2_TENSOR_METADATA},
        },
    },
}
