"""The model's life in one worker: fetch it, verify it, open an onnxruntime session, warm it up, and record each
step as an explicit load state that /health reports. No web framework here.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from service.onnx_file import with_weights_by_reference
from service.settings import ModelSource, Settings

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("service.model")

# A large model's weights are memory-mapped from the model file (service/onnx_file.py) instead of parsed and
# copied: the worker holds them once, not twice, while the session opens, and where the file lives in memory
# (Cloud Run's /tmp) the file and the session share the same pages. Prepacking would copy them again, so it is
# off for such models; it speeds up some matrix products of smaller models, which keep it.
LARGE_MODEL_BYTES = 64 * 1024 * 1024
MAPPED_INITIALIZER_BYTES = 64 * 1024

# onnxruntime's type strings -> numpy dtypes the service accepts and returns.
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in {
        "float": "float32", "double": "float64", "float16": "float16",
        "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
        "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
        "bool": "bool",
    }.items()
}  # fmt: skip


class LoadState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelLoadError(Exception):
    """The model cannot be served; the message says why and what to change."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ort_type: str
    shape: tuple[int | str | None, ...]  # ints are fixed; str/None are free (symbolic) dimensions

    @property
    def dtype(self) -> np.dtype | None:
        return ORT_DTYPES.get(self.ort_type)

    def describe_shape(self) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "N") for d in self.shape) + "]"

    def as_json(self) -> dict[str, Any]:
        dtype = self.dtype
        return {"name": self.name, "dtype": dtype.name if dtype is not None else self.ort_type, "shape": list(self.shape)}


@dataclass
class LoadStatus:
    state: LoadState = LoadState.LOADING
    step: str = "starting"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    generation: int | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    attempts: int = 0


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    generation: int | None
    size_bytes: int
    sha256: str | None = None  # when hashed on the way in; else read from the file


class ModelStore:
    """Loads the configured model once (in a background thread) and runs it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.source = settings.source
        self.status = LoadStatus()
        self.session: onnxruntime.InferenceSession | None = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.loaded = threading.Event()  # set when the load ends, either way

    @property
    def ready(self) -> bool:
        return self.status.state is LoadState.READY

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="model-load", daemon=True)
        thread.start()
        return thread

    def load(self) -> None:
        """Fetch, verify, open and warm up the model, recording each step; never raises."""
        status = self.status
        log.info("loading model", extra={"model_uri": self.source.uri})
        try:
            fetched = self._fetch()
            status.generation, status.size_bytes = fetched.generation, fetched.size_bytes
            status.step = "verifying sha256"
            status.sha256 = fetched.sha256 or file_sha256(fetched.path)
            expected = self.settings.model_sha256
            if expected and status.sha256 != expected:
                raise ModelLoadError(
                    f"sha256 mismatch: MODEL_SHA256 is {expected} but {self.source.uri} has {status.sha256}; "
                    "point MODEL_URI at the intended object (pin #GENERATION) or update MODEL_SHA256"
                )
            status.step = "opening session"
            session = open_session(fetched.path, self.settings)
            self.inputs = tuple(_spec(arg) for arg in session.get_inputs())
            self.outputs = tuple(_spec(arg) for arg in session.get_outputs())
            status.step = "warming up"
            warm_up(session, self.inputs)
            self.session = session
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
            return FetchedModel(path, None, path.stat().st_size)
        self.status.step = "downloading"
        return download_from_gcs(self.source, self.settings.model_cache_dir, self.settings.model_load_deadline, self.status)

    def run(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        assert self.session is not None, "run() before the model is ready"
        return self.session.run(None, feeds)

    def health(self) -> dict[str, Any]:
        s = self.status
        end = s.finished_at or time.time()
        return {
            "status": s.state.value,
            "model_loaded": s.state is LoadState.READY,
            "step": s.step,
            "model": {
                "uri": self.source.uri,
                "generation": s.generation,
                "sha256": s.sha256,
                "size_bytes": s.size_bytes,
            },
            "load_seconds": round(end - s.started_at, 3),
            "error": s.error,
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "model": {"uri": self.source.uri, "generation": self.status.generation, "sha256": self.status.sha256},
            "inputs": [spec.as_json() for spec in self.inputs],
            "outputs": [spec.as_json() for spec in self.outputs],
        }


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in (arg.shape or ()))
    return TensorSpec(arg.name, arg.type, shape)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_from_gcs(source: ModelSource, cache_dir: Path, deadline: float, status: LoadStatus) -> FetchedModel:
    """Download the object with the real client (crc32c verified, transient errors retried until `deadline`).

    Workers of one container share the download through a lock on the cache file, so N workers fetch once.
    """
    import google.auth.exceptions
    from google.api_core import exceptions as gexc
    from service.credentials import describe_refresh_error, storage_client
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import DEFAULT_RETRY

    def on_retry(exc: Exception) -> None:
        status.attempts += 1
        log.warning("storage not reachable yet, retrying: %s", exc, extra={"attempt": status.attempts})

    # The client's own notion of a transient error, with our deadline and a log line per retry.
    retry = Retry(
        predicate=DEFAULT_RETRY._predicate, initial=0.5, maximum=10.0, multiplier=2.0, timeout=deadline, on_error=on_retry
    )
    where = f"gs://{source.bucket}/{source.name}" + (f"#{source.generation}" if source.generation else "")
    try:
        client = storage_client()
        blob = client.bucket(source.bucket).get_blob(source.name, generation=source.generation, retry=retry, timeout=30)
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
        generation, size = blob.generation, blob.size  # a download rewrites the blob's properties from headers
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(f"{source.bucket}/{source.name}".encode()).hexdigest()[:16]
        target = cache_dir / f"{key}-{generation}.onnx"
        with _locked(target.with_suffix(".lock")):
            if target.is_file() and target.stat().st_size == size:
                log.info("model found in cache", extra={"path": str(target)})
                return FetchedModel(target, generation, size)
            partial = target.with_suffix(f".part-{os.getpid()}")
            try:
                with partial.open("wb") as file:
                    hashing = _HashingWriter(file)
                    # Pinning the generation read above means a concurrent overwrite cannot mix two objects.
                    blob.download_to_file(
                        hashing, checksum="crc32c", retry=retry, timeout=(10, 120), if_generation_match=generation
                    )
                partial.rename(target)
            finally:
                partial.unlink(missing_ok=True)
        return FetchedModel(target, generation, target.stat().st_size, hashing.digest.hexdigest())
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ModelLoadError(
            f"no Google credentials to read {where}: on Cloud Run give the service a runtime service account; "
            f"elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file ({exc})"
        ) from None
    except google.auth.exceptions.GoogleAuthError as exc:  # token refresh or exchange refused
        raise ModelLoadError(f"no Google token to read {where}: {describe_refresh_error(exc)}") from None
    except gexc.Forbidden as exc:
        raise ModelLoadError(
            f"permission denied reading {where}: grant roles/storage.objectViewer on bucket {source.bucket} "
            f"to the runtime service account ({exc.message})"
        ) from None
    except gexc.NotFound:
        raise ModelLoadError(f"{where} does not exist: check MODEL_URI") from None
    except gexc.RetryError as exc:
        raise ModelLoadError(
            f"Cloud Storage not reachable for {deadline:.0f}s (MODEL_LOAD_DEADLINE) while fetching {where}: "
            f"{exc.cause}"
        ) from None
    except Exception as exc:
        if isinstance(exc, ModelLoadError):
            raise
        # A DataCorruption (checksum) or a transport error that outlived the retries.
        raise ModelLoadError(f"download of {where} failed: {type(exc).__name__}: {exc}") from None


class _HashingWriter:
    """The download's file, hashing what is written to it: the sha256 comes with the download, not a second read."""

    def __init__(self, file: BinaryIO):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # The client rewinds only to write a transcoded object again from its start.
        if (offset, whence) != (0, os.SEEK_SET):
            raise io.UnsupportedOperation(f"seek({offset}, {whence}) while hashing a download")
        self.digest = hashlib.sha256()
        self.file.truncate(0)
        return self.file.seek(0)


class _locked:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def open_session(path: Path, settings: Settings) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Explicit thread counts: sized to the container's CPUs (not the host's), and they skip the thread
    # affinity setup that fails under Docker cpusets (microsoft/onnxruntime#29510).
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model: str | bytes = str(path)
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


def warm_up(session: onnxruntime.InferenceSession, inputs: tuple[TensorSpec, ...]) -> None:
    """One inference on zeros shaped from the model's own metadata, so the first request pays no set-up cost."""
    feeds = {}
    for spec in inputs:
        if spec.dtype is None:
            raise ModelLoadError(f"input {spec.name!r} has type {spec.ort_type}, which the service cannot accept")
        feeds[spec.name] = np.zeros([d if isinstance(d, int) else 1 for d in spec.shape], dtype=spec.dtype)
    try:
        session.run(None, feeds)
    except Exception as exc:
        raise ModelLoadError(f"the model failed a warm-up inference on zero inputs: {exc}") from None
