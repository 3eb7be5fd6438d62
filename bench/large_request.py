"""One large request (10,000 rows of the demo model): the service over HTTP, against parsing the same JSON body
and running the same session in this process; and the same rows sent by the Open Inference Protocol (V2), as JSON
and with the binary tensor data extension, bodies made and answers read by tritonclient, a real client of it."""

from __future__ import annotations

import http.client
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import orjson

from service.model_store import open_session
from service.settings import load_settings
from service.tensors import ORT_DTYPES

JSON_HEADERS = {"Content-Type": "application/json"}


class RouteMissing(Exception):
    """The service answered 404: it has no such route (yet)."""


@dataclass(frozen=True)
class V2Request:
    path: str
    body: bytes
    headers: dict[str, str]
    rows: int

    def check(self, status: int, headers: http.client.HTTPMessage, answer: bytes) -> None:
        """Raise unless the answer is a V2 inference response with one output row per input row."""
        from tritonclient.http import InferenceServerClient

        if status == 404:
            raise RouteMissing(f"POST {self.path} answers 404")
        if status != 200:
            raise RuntimeError(f"POST {self.path} answered {status}: {answer[:300]!r}")
        length = headers.get("Inference-Header-Content-Length")
        result = InferenceServerClient.parse_response_body(answer, header_length=int(length) if length else None)
        for output in result.get_response()["outputs"]:
            if result.as_numpy(output["name"]).shape[0] != self.rows:
                raise RuntimeError(f"POST {self.path}: output {output['name']} has shape {output['shape']}")


def v2_request(model_name: str, input_name: str, values: np.ndarray, outputs: list[str], binary: bool) -> V2Request:
    """POST /v2/models/{name}/infer for `values` (rows). As JSON: the same numbers as the /predict body, flattened
    in row-major order. Binary: as tritonclient sends it, the JSON header then the float32 tensor's little-endian
    bytes (Inference-Header-Content-Length), and the outputs asked for as binary too."""
    path = f"/v2/models/{model_name}/infer"
    if not binary:
        tensor = {"name": input_name, "shape": list(values.shape), "datatype": "FP32", "data": values.ravel().tolist()}
        return V2Request(path, orjson.dumps({"inputs": [tensor]}), JSON_HEADERS, len(values))
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    tensor = InferInput(input_name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32), binary_data=True)
    wanted = [InferRequestedOutput(name, binary_data=True) for name in outputs]
    body, json_size = InferenceServerClient.generate_request_body([tensor], wanted)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    return V2Request(path, body, headers, len(values))


def rows(count: int, width: int, seed: int = 0) -> np.ndarray:
    """Rows as a client would write them: numbers with a few decimals."""
    return np.round(np.random.default_rng(seed).normal(size=(count, width)), 4)


def rows_body(name: str, count: int, width: int, seed: int = 0) -> bytes:
    """A /predict request body for input `name`."""
    return orjson.dumps({"inputs": {name: rows(count, width, seed).tolist()}})


def _check_predict(status: int, headers: http.client.HTTPMessage, answer: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"/predict answered {status}: {answer[:300]!r}")


def service_seconds(port: int, body: bytes, reps: int, path: str = "/predict", headers: dict[str, str] = JSON_HEADERS,
                    check: Callable[[int, http.client.HTTPMessage, bytes], None] = _check_predict) -> list[float]:
    """Each request's round trip on one kept-alive connection, after one untimed request; `check` reads every
    answer, untimed, and raises if it is wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    try:
        for rep in range(reps + 1):
            started = time.perf_counter()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            if rep:
                times.append(time.perf_counter() - started)
            check(response.status, response.headers, answer)
    finally:
        connection.close()
    return times


def floor_seconds(model: Path, body: bytes, reps: int) -> list[float]:
    """orjson.loads + np.asarray + session.run in this process, with the session the service opens."""
    session = open_session(model, load_settings({"MODEL_URI": str(model)}))
    (spec,) = session.get_inputs()
    dtype = ORT_DTYPES[spec.type]
    times = []
    for rep in range(reps + 1):
        started = time.perf_counter()
        feeds = {spec.name: np.asarray(orjson.loads(body)["inputs"][spec.name], dtype=dtype)}
        session.run(None, feeds)
        if rep:
            times.append(time.perf_counter() - started)
    return times
