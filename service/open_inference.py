"""The Open Inference Protocol's REST routes (KServe V2 / Triton HTTP), beside /predict.

GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{version}][/ready] are FastAPI routes;
POST /v2/models/{name}[/versions/{version}]/infer is an `Endpoint` (service/app.py) with `InferProtocol` as its
codec adapter, so it shares the request path, validation and batching with /predict. Errors are the protocol's
`{"error": "..."}`: 400 for bad input, 404 for an unknown model or version, 503 while the model is not ready.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from service import v2
from service.model_store import ModelStore
from service.settings import Settings

SERVER_NAME = "onnx-serve"
SERVER_VERSION = "1"


def model_version(store: ModelStore) -> str | None:
    """The served model's version: its Cloud Storage generation, when it came from a bucket."""
    generation = store.status.generation
    return str(generation) if generation is not None else None


def find_model(store: ModelStore, name: str, version: str | None, served: str) -> tuple[int, str] | None:
    """(404, why) unless `name` (and `version`, if given) is the served model."""
    if name != served:
        return 404, f"unknown model {name!r}; this server serves {served!r}"
    current = model_version(store)
    if version is not None and version != (current or "1"):
        return 404, f"unknown version {version!r} of model {name!r}; the served version is {current or '1'!r}"
    return None


def add_routes(api: FastAPI, store: ModelStore, settings: Settings) -> None:
    served = settings.served_name

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)


    @api.get("/v2", include_in_schema=True, tags=["v2"])
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": v2.EXTENSIONS}

    @api.get("/v2/health/live", tags=["v2"])
    async def live() -> dict:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"])
    async def ready() -> JSONResponse:
        unavailable = store.unavailable()
        if unavailable is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": unavailable}, status_code=503)

    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        missing = find_model(store, name, version, served)
        if missing:
            return error(*missing)
        unavailable = store.unavailable()
        if unavailable is not None:
            return JSONResponse({"name": name, "ready": False, "error": unavailable}, 503)
        return JSONResponse({"name": name, "ready": True})

    async def model_metadata(name: str, version: str | None = None) -> JSONResponse:
        missing = find_model(store, name, version, served)
        if missing:
            return error(*missing)
        unavailable = store.unavailable()
        if unavailable is not None:
            return error(503, unavailable)
        current = model_version(store)
        return JSONResponse({
            "name": served,
            "versions": [current] if current else [],
            "platform": v2.PLATFORM,
            "inputs": [v2.tensor_metadata(spec) for spec in store.inputs],
            "outputs": [v2.tensor_metadata(spec) for spec in store.outputs],
        })  # fmt: skip

    api.add_api_route("/v2/models/{name}/ready", model_ready, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/models/{name}", model_metadata, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"], tags=["v2"])


class InferProtocol:
    """The codec adapter of POST /v2/models/{name}[/versions/{version}]/infer for `Endpoint`."""

    def __init__(self, store: ModelStore, settings: Settings):
        self.store, self.served = store, settings.served_name
        self.shared_dims = settings.check_shared_dims

    def route_error(self, scope: dict) -> tuple[int, str] | None:
        parts = scope["path"].split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
        if len(parts) == 5:
            return find_model(self.store, parts[3], None, self.served)
        if len(parts) == 7 and parts[4] == "versions":
            return find_model(self.store, parts[3], parts[5], self.served)
        return 404, "not a V2 route: POST /v2/models/{name}[/versions/{version}]/infer"

    def decode(self, body: bytes, headers: dict[bytes, bytes]) -> tuple[dict, v2.InferRequest]:
        length = headers.get(b"inference-header-content-length")
        request = v2.decode_request(
            body, length.decode("latin-1") if length is not None else None, self.store.inputs, self.store.outputs,
            shared_dims=self.shared_dims,
        )
        return request.feeds, request

    def encode(self, request: v2.InferRequest, values: list) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        body, header_length = v2.encode_response(
            request, self.store.outputs, values, self.served, model_version(self.store)
        )
        if header_length is None:
            return body, [(b"content-type", b"application/json")]
        return body, [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(header_length).encode()),
        ]

    def error(self, message: str, status: int) -> tuple[int, bytes]:
        # The protocol answers bad input with 400; a body over the size limit stays 413.
        return (400 if status == 422 else status), orjson.dumps({"error": message})
