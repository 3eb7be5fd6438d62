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

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import logs
from service.model_store import LoadState, ModelStore
from service.payload import BadRequest, decode_inputs, encode_outputs
from service.settings import Settings, SettingsError, load_settings

log = logging.getLogger("service.app")

# gunicorn's "Worker failed to boot" code: the master stops instead of forking the same failure forever.
WORKER_BOOT_ERROR = 3
RETRY_AFTER_SECONDS = "5"


def create_app(settings: Settings) -> FastAPI:
    store = ModelStore(settings)
    executor = ThreadPoolExecutor(max_workers=settings.run_threads, thread_name_prefix="inference")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.start()
        if settings.exit_on_load_failure_after >= 0:
            threading.Thread(target=_exit_if_load_fails, args=(store, settings), daemon=True).start()
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ONNX inference service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store = store
    app.add_middleware(AccessLog)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = store.health()
        return JSONResponse(body, status_code=200 if body["model_loaded"] else 503, headers={"Cache-Control": "no-store"})

    @app.get("/metadata")
    async def metadata() -> Response:
        return not_ready(store) or JSONResponse(store.metadata())

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        refusal = not_ready(store)
        if refusal:
            return refusal
        body = await read_body(request, settings.max_body_bytes)
        handle = contextvars.copy_context().run  # keep the request's trace id on log lines from the pool
        payload = await asyncio.get_running_loop().run_in_executor(executor, handle, _predict, store, body)
        return Response(payload, media_type="application/json")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    return app


def _predict(store: ModelStore, body: bytes) -> bytes:
    feeds = decode_inputs(body, store.inputs)
    try:
        values = store.run(feeds)
    except Exception as exc:  # onnxruntime's own checks: symbolic dimensions that must agree, value ranges, ...
        raise BadRequest(f"the model rejected the input: {exc}") from None
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


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes is over the {limit}-byte limit (MAX_BODY_BYTES)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body is over the {limit}-byte limit (MAX_BODY_BYTES)", 413)
        chunks.append(chunk)
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


def _app_from_environment() -> FastAPI:
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
