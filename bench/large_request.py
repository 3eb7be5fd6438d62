"""One large request (10,000 rows of the demo model): the service over HTTP, against parsing the same JSON body
and running the same session in this process."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import numpy as np
import orjson

from service.model_store import ORT_DTYPES, open_session
from service.settings import load_settings


def rows_body(name: str, rows: int, width: int, seed: int = 0) -> bytes:
    """A request body as a client would write it for input `name`: numbers with a few decimals."""
    values = np.round(np.random.default_rng(seed).normal(size=(rows, width)), 4)
    return orjson.dumps({"inputs": {name: values.tolist()}})


def service_seconds(port: int, body: bytes, reps: int) -> list[float]:
    """Each request's round trip on one kept-alive connection, after one untimed request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    try:
        for rep in range(reps + 1):
            started = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"/predict answered {response.status}: {answer[:300]!r}")
            if rep:
                times.append(time.perf_counter() - started)
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
