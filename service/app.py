"""The HTTP face of the service: /health, /metadata and /predict over one ModelStore.

`gunicorn -c service/gunicorn.conf.py service.app:app` serves `app`; tests build their own with
`create_app(settings)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service import logs
from service.model_store import LoadState, ModelStore
from service.payload import BadRequest, decode_inputs, encode_outputs, rejected_by_model
from service.settings import Settings, SettingsError, load_settings

log = logging.getLogger("service.app")

# gunicorn's "Worker failed to boot" code: the master stops instead of forking the same failure forever.
WORKER_BOOT_ERROR = 3
RETRY_AFTER_SECONDS = "5"


def create_app(settings: Settings) -> InferenceApp:
    store = ModelStore(settings)
    executor = ThreadPoolExecutor(max_workers=settings.run_threads, thread_name_prefix="inference")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.start()
        if settings.exit_on_load_failure_after >= 0:
            threading.Thread(target=_exit_if_load_fails, args=(store, settings), daemon=True).start()
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    api = FastAPI(title="ONNX inference service", lifespan=lifespan, docs_url=None, redoc_url=None)
    api.state.store = store

    @api.get("/health")
    async def health() -> JSONResponse:
        body = store.health()
        return JSONResponse(body, status_code=200 if body["model_loaded"] else 503, headers={"Cache-Control": "no-store"})

    @api.get("/metadata")
    async def metadata() -> Response:
        return not_ready(store) or JSONResponse(store.metadata())

    predict = Predict(store, executor, settings.max_body_bytes)
    # Also routed in FastAPI, so that other methods get its 405 and "/predict/" its redirect.
    api.router.add_route("/predict", predict, methods=["POST"])
    return InferenceApp(api, predict)


class InferenceApp:
    """The ASGI app gunicorn serves: an access-log line for every request, then POST /predict straight to its
    handler and everything else (/health, /metadata, errors, the lifespan) to FastAPI.

    FastAPI's middleware and routing cost more per request than a small model's whole inference (README,
    "Benchmarks"), and /predict, which validates its own input, needs none of them.
    """

    def __init__(self, api: FastAPI, predict: Predict):
        self.api, self.predict = api, predict
        self.state = api.state
        self.logged = AccessLog(self._route)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.logged(scope, receive, send)

    async def _route(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            await self.predict(scope, receive, send)
        else:
            await self.api(scope, receive, send)


class Predict:
    """POST /predict: refuse while not ready, read the body, then decode, run and encode (`_predict`)."""

    def __init__(self, store: ModelStore, executor: ThreadPoolExecutor, max_body_bytes: int):
        self.store, self.executor, self.max_body_bytes = store, executor, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        refusal = not_ready(self.store)
        if refusal:
            return await refusal(scope, receive, send)
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
            # Decoding, inference and encoding run in the pool, never on the event loop: /health and every
            # other request keep being answered while a large request or a slow model works.
            handle = contextvars.copy_context().run  # keep the request's trace id on log lines from the pool
            payload = await asyncio.get_running_loop().run_in_executor(
                self.executor, handle, _predict, self.store, body
            )
        except BadRequest as exc:
            return await JSONResponse({"detail": str(exc)}, status_code=exc.status)(scope, receive, send)
        except ClientDisconnect:
            return  # the client went away mid-body: no one to answer, nothing to log but the access line
        # The messages starlette's Response(payload, media_type="application/json") sends, without building one.
        headers = [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _predict(store: ModelStore, body: bytes) -> bytes:
    feeds = decode_inputs(body, store.inputs)
    try:
        values = store.run(feeds)
    except Exception as exc:  # onnxruntime's own checks: symbolic dimensions that must agree, value ranges, ...
        raise rejected_by_model(exc, store.inputs, feeds) from None
    return encode_outputs(store.outputs, values)


def not_ready(store: ModelStore) -> JSONResponse | None:
    status = store.status
    if status.state is LoadState.READY:
        return None
    if status.state is LoadState.FAILED:
        detail = f"the model failed to load and will not be served: {status.error}"
    else:
        detail = f"the model is still loading ({status.step}); retry shortly"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})


async def read_body(scope: dict, receive: Any, limit: int) -> bytes:
    declared = next((value.decode() for name, value in scope["headers"] if name == b"content-length"), None)
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes is over the {limit}-byte limit (MAX_BODY_BYTES)", 413)
    chunks, size = [], 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body is over the {limit}-byte limit (MAX_BODY_BYTES)", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _exit_if_load_fails(store: ModelStore, settings: Settings) -> None:
    """A failed load stays visible on /health for a while, then the process exits so the platform replaces it.

    Cloud Run's startup probe and Fly's checks then see a restart with the reason in the logs, rather than an
    instance that never becomes ready and is kept (and billed) forever.
    """
    store.loaded.wait()
    if store.status.state is not LoadState.FAILED:
        return
    delay = settings.exit_on_load_failure_after
    log.error("exiting in %.0fs because the model failed to load (EXIT_ON_LOAD_FAILURE_AFTER)", delay)
    time.sleep(delay)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


class AccessLog:
    """One JSON access-log line per request, in Cloud Logging's httpRequest form, carrying the request's trace."""

    def __init__(self, app: Any):
        self.app = app
        self.log = logging.getLogger("service.access")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        token = logs.current_trace.set(logs.parse_trace_header(headers.get(b"x-cloud-trace-context", b"").decode()))
        started = time.perf_counter()
        response: dict[str, int] = {"status": 500, "size": 0}

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body":
                response["size"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = scope.get("path", "")
            status = response["status"]
            self.log.log(
                logging.WARNING if status >= 500 and path != "/health" else logging.INFO,  # 503: still loading
                "%s %s %d",
                scope.get("method"),
                path,
                status,
                extra={
                    "httpRequest": {
                        "requestMethod": scope.get("method"),
                        "requestUrl": path + ("?" + scope["query_string"].decode() if scope.get("query_string") else ""),
                        "status": status,
                        "responseSize": str(response["size"]),
                        "latency": f"{time.perf_counter() - started:.6f}s",
                        "userAgent": headers.get(b"user-agent", b"").decode(errors="replace"),
                        "remoteIp": (scope.get("client") or ("", 0))[0],
                        "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
                    }
                },
            )
            logs.current_trace.reset(token)


def _app_from_environment() -> InferenceApp:
    try:
        settings = load_settings()
    except SettingsError as exc:
        logs.fatal(str(exc))
        raise SystemExit(WORKER_BOOT_ERROR) from None
    return create_app(settings)


def __getattr__(name: str) -> Any:
    # `service.app:app` is built on first use, so importing this module (tests, tools) needs no MODEL_URI.
    if name == "app":
        globals()["app"] = _app_from_environment()
        return globals()["app"]
    raise AttributeError(name)
