"""The throughput floor: the least an HTTP server can do to answer /predict with the same model.

A bare ASGI callable (no framework, no validation, no access log, no thread pool) served by the same gunicorn
config and Uvicorn worker as the service: `gunicorn -c service/gunicorn.conf.py bench.floor_app:app`. It opens
the session the service opens (same options, from MODEL_URI) and answers /health once it is open.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.model_store import open_session
from service.settings import load_settings
from service.tensors import ORT_DTYPES

_session: Any = None
_inputs: dict[str, np.dtype] = {}
_outputs: list[str] = []


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["path"] == "/predict":
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        inputs = orjson.loads(body)["inputs"]
        feeds = {name: np.asarray(inputs[name], dtype=dtype) for name, dtype in _inputs.items()}
        values = _session.run(None, feeds)
        outputs = orjson.dumps({"outputs": dict(zip(_outputs, values))}, option=orjson.OPT_SERIALIZE_NUMPY)
        await _respond(send, 200, outputs)
    else:
        await _respond(send, 200, b'{"model_loaded": true}')


async def _lifespan(receive: Any, send: Any) -> None:
    global _session, _inputs, _outputs
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            settings = load_settings()
            _session = open_session(settings.source.path, settings)
            _inputs = {arg.name: ORT_DTYPES[arg.type] for arg in _session.get_inputs()}
            _outputs = [arg.name for arg in _session.get_outputs()]
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
