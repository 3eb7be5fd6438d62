"""The HTTP face of the service: /health, /metadata, /predict and the Open Inference Protocol over one ModelStore.

`gunicorn -c service/gunicorn.conf.py service.app:app` serves `app`; tests build their own with
`create_app(settings)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import inspect
import logging
import operator
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable

import numpy as np
import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service import logs, open_inference, openapi
from service.auth import ApiKeys
from service.memory import MemoryBudget, OverBudget, container_memory_limit, request_cost
from service.metrics import Recorder
from service.model_store import LoadState, ModelStore, take_early_store
from service.payload import BadRequest, decode_inputs, encode_outputs, rejected_by_model
from service.scheduler import BatchPolicy, ModelRejected, Scheduler, batch_safety
from service.settings import Settings, SettingsError, load_settings
from service.worker import requests_in_flight

log = logging.getLogger("service.app")

# gunicorn's "Worker failed to boot" code: the master stops instead of forking the same failure forever.
WORKER_BOOT_ERROR = 3
RETRY_AFTER_SECONDS = "5"
# A warm-up run slower than this moves the batching self-test after the model is reported ready.
BACKGROUND_SELF_TEST_SECONDS = 0.05


def create_app(settings: Settings) -> InferenceApp:
    store = take_early_store(settings) or ModelStore(settings)  # its download may have begun at fork
    executor = ThreadPoolExecutor(max_workers=settings.run_threads, thread_name_prefix="inference")
    metrics = Recorder(settings.metrics_flush_seconds) if settings.metrics_port else None
    scheduler = Scheduler(store.run, executor, BatchPolicy(False, "the model is not loaded yet"), observer=metrics,
                          in_flight=requests_in_flight)

    def self_test() -> None:
        scheduler.policy = batch_safety(
            store.run, store.inputs, store.outputs, settings.batching, settings.max_batch_rows,
            settings.max_batch_delay_ms / 1000, example=store.example,
        )  # fmt: skip
        log.info("batching %s", scheduler.policy.reason)

    def decide_batching() -> None:
        # A model whose warm-up run was slow would keep its first request waiting for three more runs (a 1 GB
        # model: over a second): it is served at once, unbatched, while its self-test runs beside the requests.
        if settings.batching != "off" and store.status.seconds.get("warm_up", 0.0) > BACKGROUND_SELF_TEST_SECONDS:
            scheduler.policy = BatchPolicy(False, "off until the batching self-test, running since the model "
                                           "became ready, passes")  # fmt: skip
            threading.Thread(target=self_test, name="batching-self-test", daemon=True).start()
        else:
            self_test()

    store.after_load.append(("batching self-test", decide_batching))
    budget = MemoryBudget(
        container_memory_limit(settings.memory_limit_bytes), settings.web_concurrency, settings.memory_wait_seconds
    )

    def measure_memory() -> None:
        budget.measure(decoders=settings.run_threads, largest_body=settings.max_body_bytes)
        log.info("memory budget for requests in flight: %s", budget.as_json())
        if metrics:
            metrics.memory_measured(budget.limit.bytes, budget.total)

    store.after_load.append(("measuring the memory budget", measure_memory))
    if metrics:
        metrics.watch_memory(budget)
        metrics.watch_queue(scheduler)
    store.after_load.append(("freezing start-up objects", _freeze_heap))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.start()
        if settings.exit_on_load_failure_after >= 0:
            threading.Thread(target=_exit_if_load_fails, args=(store, settings), daemon=True).start()
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        if metrics:
            metrics.flush()  # the last requests' counts: uvicorn then ends the worker by its own signal

    api = FastAPI(title="ONNX inference service", lifespan=lifespan, docs_url=None, redoc_url=None)
    api.state.store = store
    api.state.scheduler = scheduler
    api.state.memory = budget

    @api.get("/health")
    async def health() -> JSONResponse:
        body = store.health()
        body["batching"] = scheduler.as_json()
        body["memory"] = budget.as_json()
        body["build"] = settings.build
        return JSONResponse(body, status_code=200 if body["model_loaded"] else 503, headers={"Cache-Control": "no-store"})

    @api.get("/metadata")
    async def metadata() -> Response:
        refusal = not_ready(store)
        if refusal:
            return refusal
        return JSONResponse({**store.metadata(), "batching": scheduler.policy.as_json()})

    open_inference.add_routes(api, store, settings)
    native = Endpoint(store, scheduler, executor, settings.max_body_bytes, NativeProtocol(store), budget, metrics)
    v2 = Endpoint(store, scheduler, executor, settings.max_body_bytes, open_inference.InferProtocol(store, settings),
                  budget, metrics)
    # Also routed in FastAPI, so that other methods get its 405 and "/predict/" its redirect.
    api.router.add_route("/predict", native, methods=["POST"])
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        api.router.add_route(path, v2, methods=["POST"])
    openapi.install(api, store, settings)
    if metrics:  # after every route: it labels requests by route template
        metrics.attach(api, store, settings.served_name)
    keys = ApiKeys(settings.api_key_list, docs_open=settings.docs) if settings.api_key_list else None
    return InferenceApp(api, native, v2, settings.access_log, metrics, keys)


def _freeze_heap() -> None:
    """Move everything the start-up made (modules, FastAPI, the model's metadata) out of the garbage collector's
    reach: a full collection then walks only what requests allocate, instead of pausing every request in flight
    for tens of milliseconds now and then (it shows in p99)."""
    gc.collect()
    gc.freeze()


class InferenceApp:
    """The ASGI app gunicorn serves: an access-log line for every request, then the inference routes (POST
    /predict and the V2 infer routes) straight to their handler and everything else (/health, /metadata, the V2
    metadata routes, errors, the lifespan) to FastAPI.

    FastAPI's middleware and routing cost more per request than a small model's whole inference
    (docs/benchmarks.md, "The request path against its floor"), and the inference routes, which validate their own
    input, need none of them.
    """

    def __init__(
        self, api: FastAPI, predict: Endpoint, infer: Endpoint, access_log: str = "all",
        metrics: Recorder | None = None, keys: ApiKeys | None = None,
    ):
        self.api, self.predict, self.infer = api, predict, infer
        self.state = api.state
        self.logged = AccessLog(api, access_log, metrics)
        self.keys = keys  # API_KEYS: checked before any route, logged like any answer

    @inspect.markcoroutinefunction  # an ASGI 3 app all the same: uvicorn awaits the coroutine it returns
    def __call__(self, scope: dict, receive: Any, send: Any) -> Awaitable[None]:
        """The inference routes' coroutine itself, not one of this app's awaiting it: every suspension and
        resumption of a request passes through each coroutine of its chain, so one less costs every request about
        a microsecond under load (docs/benchmarks.md, round 5)."""
        if scope["type"] != "http":
            return self.logged(scope, receive, send)
        if self.keys is not None:
            refusal = self.keys.refusal(scope)
            if refusal is not None:
                return self.logged(scope, receive, send, Answer(*refusal))
        if scope["method"] == "POST":
            path = scope["path"]
            if path == "/predict":
                return self.predict.handle(scope, receive, send, self.logged)
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                return self.infer.handle(scope, receive, send, self.logged)
        return self.logged(scope, receive, send)


class Answer:
    """A fixed answer (the API key check's 401) as an ASGI app."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await _send(send, self.status, self.body, self.headers)


class NativeProtocol:
    """POST /predict: {"inputs": {name: nested lists}} in, {"outputs": {name: nested lists}} out (payload.py)."""

    def __init__(self, store: ModelStore):
        self.store = store
        self.shared_dims = store.settings.check_shared_dims

    route_error = None  # no refusal of its own: every /predict names the one model (InferProtocol has one)

    def decode(self, body: bytes, headers: dict[bytes, bytes]) -> tuple[dict, Any]:
        return decode_inputs(body, self.store.inputs, shared_dims=self.shared_dims), None

    def encode(self, request: Any, values: list) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return encode_outputs(self.store.outputs, values), [JSON_CONTENT]

    def error(self, message: str, status: int) -> tuple[int, bytes]:
        return status, orjson.dumps({"detail": message})


JSON_CONTENT = (b"content-type", b"application/json")
# Bodies up to this are decoded on the event loop, larger ones in the pool: a thread hop costs more than
# parsing a few rows, and a large body must never hold up /health and the other requests.
INLINE_BODY_BYTES = 16 * 1024
INLINE_OUTPUT_BYTES = 64 * 1024


class Endpoint:
    """One inference route: refuse while not ready, admit the request against the memory budget, read the body,
    decode it (the protocol's codec), run it through the batching scheduler, encode the answer. Bad input is the
    protocol's 4xx, never a 500."""

    def __init__(self, store: ModelStore, scheduler: Scheduler, executor: ThreadPoolExecutor, max_body_bytes: int,
                 protocol: Any, budget: MemoryBudget, metrics: Recorder | None = None):
        self.store, self.scheduler, self.executor = store, scheduler, executor
        self.max_body_bytes, self.protocol = max_body_bytes, protocol
        self.budget, self.metrics = budget, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)  # (FastAPI's route: its AccessLog logs the request)

    async def handle(self, scope: dict, receive: Any, send: Any, logged: AccessLog | None = None) -> None:
        """Answer the request, then, with `logged`, record it as `AccessLog` does (its metrics, its line if one is
        due, its trace): `InferenceApp` hands the request here directly (the hot path)."""
        headers = dict(scope["headers"])
        token = None
        if logged is not None and (b"traceparent" in headers or b"x-cloud-trace-context" in headers):
            token = _trace(headers)
        started = time.perf_counter()
        status = size = 0
        try:
            protocol = self.protocol
            # Every Python call on this path costs a request about half a microsecond (docs/benchmarks.md, round
            # 5): a ready model on a route with nothing of its own to refuse (/predict) asks nothing more.
            if protocol.route_error is not None or self.store.status.state is not LoadState.READY:
                unavailable = self.store.unavailable()
                refused = protocol.route_error and protocol.route_error(scope)
                refused = refused or (unavailable and (503, unavailable))
                if refused:
                    code, message = refused  # (not `status`: a send that fails is recorded as 500)
                    extra = [(b"retry-after", RETRY_AFTER_SECONDS.encode())] if code == 503 else []
                    status, size = await _send(send, *protocol.error(message, code), [JSON_CONTENT, *extra])
                    return
            held = 0  # bytes of the memory budget this request holds (service/memory.py)
            budget = self.budget
            try:
                declared = headers.get(b"content-length")
                length = int(declared) if declared is not None and declared.isdigit() else None
                if length is not None:
                    if length > self.max_body_bytes:
                        raise BadRequest(f"request body of {length} bytes is over the {self.max_body_bytes}-byte "
                                         "limit (MAX_BODY_BYTES)", 413)  # fmt: skip
                    if budget.total is not None:  # no budget (no memory limit known): nothing to take or give back
                        cost = request_cost(length)
                        taken = budget.take_now(cost)  # before a byte of the body is read; no await when it fits
                        held = taken if taken is not None else await budget.admit(cost)
                message = await receive()  # the whole body in one message: every body the server has whole
                if message["type"] == "http.request" and not message.get("more_body", False):
                    body = message.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        raise BadRequest(f"request body is over the {self.max_body_bytes}-byte limit "
                                         "(MAX_BODY_BYTES)", 413)  # fmt: skip
                else:
                    body = await read_body(receive, self.max_body_bytes, message)
                if length is None:
                    held = await budget.admit(request_cost(len(body)))  # chunked: by the bytes read
                if len(body) > INLINE_BODY_BYTES:
                    # The request's trace id rides along to log lines written in the pool.
                    loop = asyncio.get_running_loop()
                    handle = contextvars.copy_context().run
                    decoded, answer = await loop.run_in_executor(self.executor, handle, self._large, body,
                                                                 headers)  # fmt: skip
                    if answer is not None:
                        ran, seconds, (payload, headers_out) = answer
                        self.scheduler.record(ran, seconds)
                        status, size = await _send(send, 200, payload, headers_out)
                        return
                    feeds, request = decoded
                else:
                    feeds, request = protocol.decode(body, headers)
                try:
                    # A request alone in the worker runs here and now; any other goes through the batching.
                    scheduler = self.scheduler
                    # (a batch running: not alone, and no call to ask; under load, most requests)
                    values = None if scheduler.busy else scheduler.run_now_if_alone(feeds)
                    if values is None:
                        pending = scheduler.enqueue(feeds)
                        waiting = scheduler.outputs(pending) if pending is not None else scheduler.submit(feeds)
                        values = await waiting
                except ModelRejected as exc:  # onnxruntime's own checks: dimensions that must agree, value ranges...
                    raise rejected_by_model(exc.cause, self.store.inputs, feeds) from None
                try:  # the outputs' bytes: all arrays, the usual outputs
                    output_bytes = sum(map(_NBYTES, values))
                except AttributeError:
                    output_bytes = _mixed_output_bytes(values)
                if output_bytes > INLINE_OUTPUT_BYTES:
                    handle = contextvars.copy_context().run
                    payload, headers_out = await asyncio.get_running_loop().run_in_executor(
                        self.executor, handle, protocol.encode, request, values)  # fmt: skip
                else:
                    payload, headers_out = protocol.encode(request, values)
            except BadRequest as exc:
                status, size = await _send(send, *protocol.error(str(exc), exc.status), [JSON_CONTENT])
                return
            except ClientDisconnect:
                # the client went away mid-body: no one to answer, nothing to log but the access line
                status, size = 499, 0
                return
            except OverBudget as exc:
                status, size = await self._refuse(exc, send)
                return
            finally:
                if held:
                    budget.release(held)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(payload)).encode()), *headers_out]})  # fmt: skip
            await send({"type": "http.response.body", "body": payload})
            status, size = 200, len(payload)
        finally:
            if logged is not None:  # `logged.finish`, unrolled: a Python call costs this path about 0.5 µs
                status = status or 500
                if logged.metrics is not None:
                    logged.metrics.request(scope["path"], status, time.perf_counter() - started)
                if token is not None or status >= logged.lowest_line:
                    logged.after(scope, headers, status, size, started, token)

    async def _refuse(self, exc: OverBudget, send: Any) -> tuple[int, int]:
        """Answer a request the memory budget refused: 503 with Retry-After, or 413. Its body, unread, is read and
        dropped by the HTTP protocol after the answer (service/worker.py), never left to reset the connection."""
        if self.metrics is not None:
            self.metrics.memory_refused(exc.status)
        extra = [(b"retry-after", b"1")] if exc.status == 503 else []
        return await _send(send, *self.protocol.error(str(exc), exc.status), [JSON_CONTENT, *extra])

    def _large(self, body: bytes, headers: dict[bytes, bytes]) -> tuple[tuple[dict, Any] | None, Any]:
        """In the pool: decode a large body; a request too big to share a batch is run and encoded here too, in
        the same hop. ((feeds, request) to schedule, None) or (None, (feeds, seconds, (payload, headers)))."""
        feeds, request = self.protocol.decode(body, headers)
        if self.scheduler.would_batch(feeds):
            return (feeds, request), None
        try:
            values, seconds = self.scheduler.run_now(feeds)
        except ModelRejected as exc:
            raise rejected_by_model(exc.cause, self.store.inputs, feeds) from None
        return None, (feeds, seconds, self.protocol.encode(request, values))


def _mixed_output_bytes(values: list) -> int:
    """The outputs' bytes when not all are arrays, counting anything else (skl2onnx's lists of maps) as
    INLINE_OUTPUT_BYTES: encoded in the pool."""
    return sum(v.nbytes if isinstance(v, np.ndarray) else INLINE_OUTPUT_BYTES for v in values)


_NBYTES = operator.attrgetter("nbytes")


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    # The messages starlette's Response sends, without building one.
    headers = [(b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status, len(body)


def not_ready(store: ModelStore) -> JSONResponse | None:
    reason = store.unavailable()
    if reason is None:
        return None
    return JSONResponse({"detail": reason}, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})


async def read_body(receive: Any, limit: int, message: dict | None = None) -> bytes:
    """The request's body, up to `limit` bytes (413 beyond); ClientDisconnect if the client goes away.
    `message`: the first one, when the caller received it already."""
    if message is None:
        message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    body = message.get("body", b"")
    if len(body) > limit:
        raise BadRequest(f"request body is over the {limit}-byte limit (MAX_BODY_BYTES)", 413)
    if not message.get("more_body", False):
        return body  # the whole body in one message: every body the server has whole when the app asks
    chunks, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body is over the {limit}-byte limit (MAX_BODY_BYTES)", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
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
    """One JSON access-log line per request, in Cloud Logging's httpRequest form, carrying the request's trace;
    and the request's route, status and latency for the metrics.

    Every route but the inference ones goes through `__call__`, which watches the answer go out; the inference
    routes, the hot path, record themselves as `finish` does (`Endpoint.handle`).
    """

    def __init__(self, app: Any, mode: str = "all", metrics: Recorder | None = None):
        """mode: "all" requests, only "errors" (answers >= 400), or "off" (ACCESS_LOG)."""
        self.app, self.metrics = app, metrics
        self.enabled = mode != "off"
        self.lowest_line = 1000 if mode == "off" else 400 if mode == "errors" else 0  # the least status with a line
        self.lines = logs.AccessLines()

    async def __call__(self, scope: dict, receive: Any, send: Any, app: Any = None) -> None:
        """Serve the request by `app` (default: the app this log wraps), and log it."""
        app = app or self.app
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        token = _trace(headers)
        started = time.perf_counter()
        response = [500, 0]  # status, body bytes

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                response[0] = message["status"]
            elif message["type"] == "http.response.body":
                response[1] += len(message.get("body", b""))
            await send(message)

        try:
            await app(scope, receive, record if self.enabled or self.metrics else send)
        finally:
            self.finish(scope, headers, response[0], response[1], started, token)

    def finish(self, scope: dict, headers: dict, status: int, size: int, started: float, token: Any) -> None:
        """A request answered: its metrics, then `after` (its line, its trace)."""
        if self.metrics is not None:
            self.metrics.request(scope["path"], status, time.perf_counter() - started)
        self.after(scope, headers, status, size, started, token)

    def after(self, scope: dict, headers: dict, status: int, size: int, started: float, token: Any) -> None:
        """A request answered and its metrics recorded: its access-log line, if any, and its trace reset. Nothing
        to do unless `token` is set or `status >= self.lowest_line`: the hot path (`Endpoint.handle`) asks first."""
        path = scope["path"]
        if status >= self.lowest_line:
            level = logging.WARNING if status >= 500 and path != "/health" else logging.INFO  # 503: still loading
            if self.lines.enabled(level):
                self.lines.request(level, scope, headers, status, size, time.perf_counter() - started)
        if token is not None:
            logs.current_trace.reset(token)


def _trace(headers: dict[bytes, bytes]) -> Any:
    """Set the request's trace for every line logged while serving it; the token to reset it, or None."""
    traceparent, cloud_trace = headers.get(b"traceparent"), headers.get(b"x-cloud-trace-context")
    if traceparent is None and cloud_trace is None:
        return None
    trace = logs.trace_from_headers(traceparent, cloud_trace)
    return logs.current_trace.set(trace) if trace else None


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
