"""The model's life in one worker: fetch it, verify it, open an onnxruntime session, warm it up, and record each
step as an explicit load state that /health reports. No web framework here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from service.gcs_download import GenerationChanged, SlicePlan, fetch_object
from service.onnx_file import external_data_locations, with_weights_by_reference
from service.payload import BadRequest, decode_inputs
from service.settings import ModelSource, Settings, parse_model_uri
from service.tensors import TensorSpec

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("service.model")

# A large model's weights are memory-mapped from the model file (service/onnx_file.py) instead of parsed and
# copied: the worker holds them once, not twice, while the session opens, and where the file lives in memory
# (Cloud Run's /tmp) the file and the session share the same pages. Prepacking would copy them again, so it is
# off for such models; it speeds up some matrix products of smaller models, which keep it.
LARGE_MODEL_BYTES = 64 * 1024 * 1024
MAPPED_INITIALIZER_BYTES = 64 * 1024

class LoadState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelLoadError(Exception):
    """The model cannot be served; the message says why and what to change."""


class Progress:
    """Bytes of the model's files fetched so far. Each file's count is written only by its own download, and
    every file is registered before any download starts, so readers need no lock."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def add(self, name: str, size: int, done: int = 0) -> None:
        self.sizes[name], self.done[name] = size, done

    def as_json(self) -> dict[str, int]:
        sizes, done = dict(self.sizes), dict(self.done)
        return {
            "bytes_done": sum(done.values()),
            "bytes_total": sum(sizes.values()),
            "files": len(sizes),
            "files_done": sum(done.get(name) == size for name, size in sizes.items()),
        }


@dataclass
class LoadStatus:
    state: LoadState = LoadState.LOADING
    step: str = "starting"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    generation: int | None = None
    sha256: str | None = None
    size_bytes: int | None = None  # all files of the model: the .onnx and its external data
    attempts: int = 0
    progress: Progress = field(default_factory=Progress)
    data_files: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each finished step's time: download, verify, ...

    def timed(self, step: str, since: float) -> float:
        """Record `step` as having taken from `since` to now; returns now (the next step's start)."""
        now = time.perf_counter()
        self.seconds[step] = round(now - since, 3)
        return now


@dataclass(frozen=True)
class FetchedFile:
    name: str  # the .onnx file's own name, or an external data file's location as the model names it
    path: Path
    size_bytes: int
    generation: int | None = None
    sha256: str | None = None  # when hashed on the way in (or recorded then); else read from the file

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size_bytes, "generation": self.generation, "sha256": self.sha256}


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    generation: int | None
    size_bytes: int
    sha256: str | None = None
    data_files: tuple[FetchedFile, ...] = ()  # the files its tensors' external data lives in, beside `path`


class ModelStore:
    """Loads the configured model once (in a background thread) and runs it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.source = settings.source
        self.status = LoadStatus()
        self.session: onnxruntime.InferenceSession | None = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.example: dict[str, np.ndarray] | None = None  # an input the model ran at warm-up
        self.path: Path | None = None  # the local file the session was opened from (the cached download)
        self.loaded = threading.Event()  # set when the load ends, either way
        # Steps others add to the load, run after the warm-up and before the model is reported ready (the
        # batching self-test): (step name shown on /health, callable). They must not raise.
        self.after_load: list[tuple[str, Callable[[], None]]] = []
        self._fetching: tuple[float, Future] | None = None  # a download begun early (fetch_early): start, result
        # What `run` calls, once the session is open (`session_runner`): run(output names, feeds, None).
        self._run: Callable[[list[str] | None, dict[str, np.ndarray], Any], list[Any]] = _not_loaded
        self._output_names: list[str] | None = None

    @property
    def ready(self) -> bool:
        return self.status.state is LoadState.READY

    def unavailable(self) -> str | None:
        """Why predictions are refused now (still loading, or a failed load with its reason); None when ready.
        Every protocol's 503 says this."""
        status = self.status
        if status.state is LoadState.READY:
            return None
        if status.state is LoadState.FAILED:
            return f"the model failed to load and will not be served: {status.error}"
        return f"the model is still loading ({status.step}); retry shortly"

    def fetch_early(self) -> None:
        """Begin the download now, on a thread of its own; load() takes its result. The worker calls this as soon as
        it is forked (service/gunicorn.conf.py), so the files arrive while it still imports the web framework."""
        started, future = time.perf_counter(), Future()

        def fetch() -> None:
            try:
                future.set_result(self._fetch())
            except BaseException as exc:  # handed to load(), which reports it
                future.set_exception(exc)

        self._fetching = (started, future)
        threading.Thread(target=fetch, name="model-fetch", daemon=True).start()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="model-load", daemon=True)
        thread.start()
        return thread

    def load(self) -> None:
        """Fetch, verify, open and warm up the model, recording each step; never raises."""
        status = self.status
        log.info("loading model", extra={"model_uri": self.source.uri})
        try:
            if self._fetching:
                mark, future = self._fetching
                fetched = future.result()
            else:
                mark = time.perf_counter()
                fetched = self._fetch()
            mark = status.timed("download", mark)  # with the sha256 and crc32c, computed as the bytes arrived
            status.generation = fetched.generation
            status.size_bytes = fetched.size_bytes + sum(f.size_bytes for f in fetched.data_files)
            status.step = "verifying sha256"
            status.sha256 = fetched.sha256 or file_sha256(fetched.path)
            status.data_files = [f.as_json() for f in verify_sha256(self.settings, fetched, status.sha256)]
            mark = status.timed("verify", mark)
            status.step = "opening session"
            session = open_session(fetched.path, self.settings, external_data=bool(fetched.data_files))
            self.path = fetched.path
            mark = status.timed("session", mark)
            self.inputs = tuple(TensorSpec.of(arg) for arg in session.get_inputs())
            self.outputs = tuple(TensorSpec.of(arg) for arg in session.get_outputs())
            for spec in self.inputs:
                if spec.dtype is None:
                    raise ModelLoadError(
                        f"input {spec.name!r} has type {spec.ort_type}, which the service cannot accept: it takes "
                        "tensors of numbers, booleans and strings, not sequences, maps, optionals, bfloat16 or float8"
                    )
            status.step = "warming up"
            warning, self.example = warm_up(session, self.inputs, self.settings)
            mark = status.timed("warm_up", mark)
            if warning:
                status.warnings.append(warning)
                log.warning(warning, extra={"model_uri": self.source.uri})
            self.session = session
            self._run, self._output_names = session_runner(session, self.example)
            for step, hook in self.after_load:
                status.step = step
                hook()
                mark = status.timed(step, mark)
        except Exception as exc:  # every failure becomes a reason on /health, never a crash of the worker
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            status.error = reason
            status.state = LoadState.FAILED
            status.finished_at = time.time()
            log.error("model load failed: %s", reason, extra={"model_uri": self.source.uri, "step": status.step})
        else:
            status.step = "serving"
            status.state = LoadState.READY
            status.finished_at = time.time()
            log.info(
                "model loaded in %.2fs",
                status.finished_at - status.started_at,
                extra={"model_uri": self.source.uri, "sha256": status.sha256, "generation": status.generation},
            )
        finally:
            self.loaded.set()

    def _fetch(self) -> FetchedModel:
        if not self.source.is_gcs:
            path = self.source.path
            assert path is not None
            if not path.is_file():
                raise ModelLoadError(f"model file {path} does not exist: check MODEL_URI")
            return local_model(path, self.status.progress)
        self.status.step = "downloading"
        return download_from_gcs(self.source, self.settings, self.status)

    def run(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        """Every output of the model for `feeds`: the request path's one call into onnxruntime."""
        return self._run(self._output_names, feeds, None)

    def health(self) -> dict[str, Any]:
        s = self.status
        end = s.finished_at or time.time()
        return {
            "status": s.state.value,
            "model_loaded": s.state is LoadState.READY,
            "step": s.step,
            "progress": s.progress.as_json(),
            "model": {
                "uri": self.source.uri,
                "generation": s.generation,
                "sha256": s.sha256,
                "size_bytes": s.size_bytes,
                "data_files": s.data_files,
            },
            "load_seconds": round(end - s.started_at, 3),
            "load_steps": dict(s.seconds),
            "error": s.error,
            "warnings": list(s.warnings),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "model": {"uri": self.source.uri, "generation": self.status.generation, "sha256": self.status.sha256},
            "inputs": [spec.as_json() for spec in self.inputs],
            "outputs": [spec.as_json() for spec in self.outputs],
        }


# The store of this worker when its download began before the app was built (begin_in_worker); create_app takes it.
_early: ModelStore | None = None


def begin_in_worker(settings: Settings) -> None:
    """In a freshly forked worker, before the app is imported: make its store and begin the download."""
    global _early
    _early = ModelStore(settings)
    _early.fetch_early()


def take_early_store(settings: Settings) -> ModelStore | None:
    """The store begin_in_worker made for these settings, once; None when there is none."""
    global _early
    store, _early = _early, None
    return store if store is not None and store.settings == settings else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(settings: Settings, fetched: FetchedModel, model_sha256: str) -> tuple[FetchedFile, ...]:
    """Check MODEL_SHA256: one digest covers the .onnx file (its data files are covered by the storage's crc32c
    and the pinned generation); the manifest form `file=sha256,...` must name every file of the model.

    Returns the data files, each with its sha256 when it was checked or known."""
    expected = settings.sha256_by_file
    model_name = fetched.path.name
    if "" in expected:
        expected = {model_name: expected[""]}
    elif expected:
        names = [model_name, *(f.name for f in fetched.data_files)]
        unknown = sorted(set(expected) - set(names))
        unlisted = [name for name in names if name not in expected]
        if unknown or unlisted:
            raise ModelLoadError(
                f"MODEL_SHA256 must give the sha256 of every file of the model, {names}, and no other"
                + (f"; it lists {unknown}, which the model does not use" if unknown else "")
                + (f"; it has none for {unlisted}" if unlisted else "")
            )
    if expected.get(model_name, model_sha256) != model_sha256:
        raise ModelLoadError(
            f"sha256 mismatch: MODEL_SHA256 is {expected[model_name]} but {settings.model_uri} has {model_sha256}; "
            "point MODEL_URI at the intended object (pin #GENERATION) or update MODEL_SHA256"
        )
    checked = []
    for data in fetched.data_files:
        if data.name in expected:
            actual = data.sha256 or file_sha256(data.path)
            if actual != expected[data.name]:
                raise ModelLoadError(
                    f"sha256 mismatch: MODEL_SHA256 gives {expected[data.name]} for the model's data file "
                    f"{data.name!r} but it has {actual}; upload the intended file beside the model or update MODEL_SHA256"
                )
            data = dataclasses.replace(data, sha256=actual)
        checked.append(data)
    return tuple(checked)


def data_file_names(model_path: Path, where: str) -> list[str]:
    """The external data files the model names, each a path relative to the model's own folder."""
    names = external_data_locations(model_path)
    for name in names:
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or "\\" in name or ".." in parts:
            raise ModelLoadError(
                f"{where} keeps tensor data in {name!r}, outside its own folder; onnxruntime only reads external "
                "data from beside the model: save the model with a relative location such as model.onnx.data"
            )
    return names


def local_model(path: Path, progress: Progress) -> FetchedModel:
    """A model on a local (or mounted) path, and the external data files beside it."""
    data = []
    for name in data_file_names(path, str(path)):
        file = path.parent / name
        if not file.is_file():
            raise ModelLoadError(
                f"the model's external data file {name!r} is missing: expected {file} beside {path.name}; "
                "copy every file the model was saved with"
            )
        data.append(FetchedFile(name, file, file.stat().st_size))
    size = path.stat().st_size
    progress.add(path.name, size, size)
    for file in data:
        progress.add(file.name, file.size_bytes, file.size_bytes)
    return FetchedModel(path, None, size, data_files=tuple(data))


def storage_client():
    """The google-cloud-storage client every read of the bucket goes through: keyless on Fly when configured,
    else Application Default Credentials (service/credentials.py)."""
    from service import credentials

    return credentials.storage_client()


def download_from_gcs(source: ModelSource, settings: Settings, status: LoadStatus) -> FetchedModel:
    """Download the model object and the external data files it names, beside it in the cache.

    Each file is read at the generation its metadata showed (a concurrent overwrite cannot mix two objects),
    large ones as ranged reads several at a time (service/gcs_download.py), crc32c verified and its transient
    errors retried until MODEL_LOAD_DEADLINE; data files download in parallel. An object replaced during the
    download starts it again on the new generation, unless MODEL_URI pins one. Workers of one container share
    the download through a lock on the model's cache folder, so N workers fetch once.
    """
    plan = SlicePlan(settings.model_download_concurrency, settings.model_download_slice_bytes)
    with ThreadPoolExecutor(max_workers=plan.concurrency, thread_name_prefix="ranged-read") as pool:
        for attempt in range(1, RESTARTS_ON_CHANGE + 1):
            try:
                return _download_generation(source, settings.model_cache_dir, settings.model_load_deadline, status,
                                            pool, plan)  # fmt: skip
            except GenerationChanged as exc:
                if source.generation or attempt == RESTARTS_ON_CHANGE:
                    raise ModelLoadError(
                        f"{exc}: MODEL_URI {source.uri} changed while it downloaded; "
                        + ("pin a generation that stays (MODEL_URI#GENERATION in a bucket with object versioning)"
                           if source.generation else "upload the model once and restart the service")
                    ) from None
                log.warning("%s; downloading the new generation", exc, extra={"model_uri": source.uri})
    raise AssertionError("unreachable")


# An object replaced during the download is fetched again, at its new generation, at most this often in all.
RESTARTS_ON_CHANGE = 3


def _download_generation(
    source: ModelSource, cache_dir: Path, deadline: float, status: LoadStatus, pool: Executor, plan: SlicePlan
) -> FetchedModel:
    retry = _retry(deadline, status)
    where = f"gs://{source.bucket}/{source.name}" + (f"#{source.generation}" if source.generation else "")
    with storage_errors(where, source.bucket, deadline):
        bucket = storage_client().bucket(source.bucket)
        blob = bucket.get_blob(source.name, generation=source.generation, retry=retry, timeout=30)
        if blob is None:
            raise ModelLoadError(
                f"{where} does not exist: check MODEL_URI (bucket, object path, #generation) "
                f"and that the runtime service account can read bucket {source.bucket}"
            )
        if source.generation and blob.generation != source.generation:
            raise ModelLoadError(
                f"{where} does not exist (the object's generation is {blob.generation}): "
                "pin an existing generation in MODEL_URI, or drop #GENERATION to serve the current object"
            )
        key = hashlib.sha256(f"{source.bucket}/{source.name}".encode()).hexdigest()[:16]
        folder = cache_dir / f"{key}-{blob.generation}"
        folder.mkdir(parents=True, exist_ok=True)
        name = PurePosixPath(source.name).name
        with _locked(folder.with_suffix(".lock")):
            cache = _CacheRecord(folder, pool, plan)
            try:
                model = cache.fetch(blob, name, status.progress, retry)
                blobs = _data_file_blobs(bucket, source, data_file_names(model.path, where), retry, status.progress)
                if blobs:
                    status.step = f"downloading {len(blobs)} external data file(s)"

                def fetch_data(item: tuple[str, Any]) -> FetchedFile:
                    data_name, data_blob = item
                    with storage_errors(f"gs://{source.bucket}/{data_blob.name}", source.bucket, deadline):
                        return cache.fetch(data_blob, data_name, status.progress, retry)

                with ThreadPoolExecutor(max_workers=min(8, len(blobs) or 1), thread_name_prefix="download") as files:
                    data = tuple(files.map(fetch_data, blobs))
            finally:
                cache.save()
        return FetchedModel(model.path, model.generation, model.size_bytes, model.sha256, data)


def _data_file_blobs(bucket: Any, source: ModelSource, names: list[str], retry: Any, progress: Progress) -> list:
    """(name, blob) of each external data file, read beside the model's object; each registered for progress."""
    blobs = []
    for name in names:
        object_name = str(PurePosixPath(source.name).parent / name).removeprefix("./")
        blob = bucket.get_blob(object_name, retry=retry, timeout=30)
        if blob is None:
            raise ModelLoadError(
                f"the model's external data file {name!r} is missing: expected gs://{source.bucket}/{object_name} "
                f"beside gs://{source.bucket}/{source.name}; upload every file the model was saved with"
            )
        progress.add(name, blob.size)
        blobs.append((name, blob))
    return blobs


def _retry(deadline: float, status: LoadStatus | None = None):
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import DEFAULT_RETRY

    def on_retry(exc: Exception) -> None:
        if status:
            status.attempts += 1
        log.warning("storage not reachable yet, retrying: %s", exc, extra={"attempt": status and status.attempts})

    # The client's own notion of a transient error, with our deadline and a log line per retry.
    return Retry(
        predicate=DEFAULT_RETRY._predicate, initial=0.5, maximum=10.0, multiplier=2.0, timeout=deadline, on_error=on_retry
    )


@contextlib.contextmanager
def storage_errors(where: str, bucket: str | None, deadline: float) -> Iterator[None]:
    """Cloud Storage's exceptions as a ModelLoadError that says what to change."""
    import google.auth.exceptions
    from google.api_core import exceptions as gexc

    try:
        yield
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ModelLoadError(
            f"no Google credentials to read {where}: on Cloud Run give the service a runtime service account; "
            f"elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file ({exc})"
        ) from None
    except google.auth.exceptions.GoogleAuthError as exc:  # token refresh or exchange refused
        from service.credentials import describe_refresh_error

        raise ModelLoadError(f"no Google token to read {where}: {describe_refresh_error(exc)}") from None
    except gexc.Forbidden as exc:
        raise ModelLoadError(
            f"permission denied reading {where}: grant roles/storage.objectViewer on bucket {bucket} "
            f"to the runtime service account ({exc.message})"
        ) from None
    except gexc.NotFound:
        raise ModelLoadError(f"{where} does not exist: check MODEL_URI") from None
    except gexc.RetryError as exc:
        raise ModelLoadError(
            f"Cloud Storage not reachable for {deadline:.0f}s (MODEL_LOAD_DEADLINE) while fetching {where}: "
            f"{exc.cause}"
        ) from None
    except (ModelLoadError, GenerationChanged):
        raise
    except Exception as exc:
        # A DataCorruption (checksum) or a transport error that outlived the retries.
        raise ModelLoadError(f"download of {where} failed: {type(exc).__name__}: {exc}") from None


class _CacheRecord:
    """The files of one model generation in the cache folder, and beside it (FOLDER.json) the generation, size and
    sha256 each was fetched at: a data file overwritten in the bucket is fetched again, a cached one not re-hashed."""

    def __init__(self, folder: Path, pool: Executor, plan: SlicePlan):
        self.folder, self.path = folder, folder.with_suffix(".json")
        self.pool, self.plan = pool, plan  # where and how large objects are read as ranged reads
        try:
            self.files: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.files = {}

    def fetch(self, blob: Any, name: str, progress: Progress, retry: Any) -> FetchedFile:
        generation, size = blob.generation, blob.size  # a download rewrites the blob's properties from headers
        target = self.folder / name
        known = self.files.get(name, {})
        if known.get("generation") == generation and target.is_file() and target.stat().st_size == size:
            log.info("model found in cache", extra={"path": str(target)})
            progress.add(name, size, size)
            return FetchedFile(name, target, size, generation, known.get("sha256"))
        progress.add(name, size)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.part-{os.getpid()}")
        try:
            sha256 = fetch_object(blob, partial, progress, name, retry, self.pool, self.plan)
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
        self.files[name] = {"generation": generation, "size": size, "sha256": sha256}
        return FetchedFile(name, target, size, generation, sha256)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.files))


class _locked:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _not_loaded(names: Any, feeds: Any, options: Any) -> list[Any]:
    raise RuntimeError("run() before the model is ready")


def session_runner(session: onnxruntime.InferenceSession, example: dict[str, np.ndarray] | None) -> tuple[
    Callable[[list[str] | None, dict[str, np.ndarray], Any], list[Any]], list[str] | None
]:
    """(run, output names) such that `run(names, feeds, None)` is `session.run(None, feeds)`, for the request path.

    Where it can, without the Python wrapper's per-call steps, which have nothing to do here: it checks that no
    input is missing (every codec has, naming the input), that feeds are not another session's OrtValues (they
    are numpy arrays), WebGPU graph capture and an execution provider's fallback (the session is CPU only), then
    calls its C++ session's `run`. That is about 90 Python bytecodes a call, 1-2 microseconds on a request path
    (docs/benchmarks.md). The wrapper is kept if this onnxruntime has no such C++ session, or if its `run` does
    not give outputs of the same kinds, shapes and dtypes as the wrapper's for `example` (an input the model ran at
    warm-up; without one, the wrapper)."""
    inner = getattr(session, "_sess", None)
    direct = getattr(inner, "run", None)
    if direct is None or example is None or session.get_providers() != ["CPUExecutionProvider"]:
        return session.run, None
    names = [output.name for output in session.get_outputs()]
    try:
        same = _same_outputs(direct(names, example, None), session.run(None, example))
    except Exception:  # not the (output names, feeds, run options) this was written against
        same = False
    return (direct, names) if same else (session.run, None)


def _same_outputs(got: list[Any], expected: list[Any]) -> bool:
    return len(got) == len(expected) and all(
        isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
        or not isinstance(a, np.ndarray) and type(a) is type(b)
        for a, b in zip(got, expected)
    )


def open_session(path: Path, settings: Settings, external_data: bool = False) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Explicit thread counts: sized to the container's CPUs (not the host's), and they skip the thread
    # affinity setup that fails under Docker cpusets (microsoft/onnxruntime#29510).
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Opened by path, onnxruntime memory-maps external data files from beside the model (the cache) rather
    # than reading them into memory; prepacking would copy the weights again, so it is off for such models.
    model: str | bytes = str(path)
    if external_data:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if path.stat().st_size >= LARGE_MODEL_BYTES:
        by_reference = with_weights_by_reference(path, MAPPED_INITIALIZER_BYTES)
        if by_reference:
            model = by_reference
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(
            f"{settings.model_uri} is not a model onnxruntime can open ({type(exc).__name__}: {exc}); "
            "check that MODEL_URI points at an .onnx file"
        ) from None


def warm_up(
    session: onnxruntime.InferenceSession, inputs: tuple[TensorSpec, ...], settings: Settings
) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """One inference before the model is reported ready, so the first request pays no set-up cost.

    With WARMUP_INPUT, the user's own example, whose failure is a load failure. Without it, a guess (zeros, or
    empty strings, with every free dimension 1) that some good models refuse (a minimum input length, a sample
    rate of 0): its failure is returned as a warning and the model is served. Returns (warning, the feeds that
    ran: an input the model is known to take, which the batching self-test shapes its rows after).
    """
    if settings.warmup_input:
        feeds = warmup_feeds(settings.warmup_input, inputs, settings)
        try:
            session.run(None, feeds)
        except Exception as exc:
            raise ModelLoadError(f"the model failed its warm-up inference on WARMUP_INPUT: {exc}") from None
        return None, feeds
    feeds = {spec.name: _guessed_input(spec) for spec in inputs}
    try:
        session.run(None, feeds)
    except Exception as exc:
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.items())
        return (
            f"the guessed warm-up ({shapes} of zeros) failed, so the first request pays the set-up cost; "
            f"set WARMUP_INPUT to a real example to warm up (and check) the model: {exc}"
        ), None
    return None, feeds


def _guessed_input(spec: TensorSpec) -> np.ndarray:
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    if spec.dtype is not None and spec.dtype.kind == "O":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)


def warmup_feeds(example: str, inputs: tuple[TensorSpec, ...], settings: Settings) -> dict[str, np.ndarray]:
    """WARMUP_INPUT, a /predict body given inline, as a local path or as a gs:// object, as the model's feeds."""
    example = example.strip()
    if example.startswith("{"):
        body, where = example.encode(), "WARMUP_INPUT"
    elif example.startswith("gs://"):
        source = parse_model_uri(example)
        where = f"WARMUP_INPUT {example}"
        with storage_errors(example, source.bucket, settings.model_load_deadline):
            blob = storage_client().bucket(source.bucket).blob(source.name, generation=source.generation)
            body = blob.download_as_bytes(retry=_retry(settings.model_load_deadline), timeout=(10, 120))
    else:
        where = f"WARMUP_INPUT {example}"
        try:
            body = Path(example).expanduser().read_bytes()
        except OSError as exc:
            raise ModelLoadError(
                f"{where} cannot be read ({exc.strerror}): give a /predict JSON body, a file or a gs:// object"
            ) from None
    try:
        return decode_inputs(body, inputs, shared_dims=settings.check_shared_dims)
    except BadRequest as exc:
        raise ModelLoadError(f"{where} is not a valid request for this model: {exc}") from None
