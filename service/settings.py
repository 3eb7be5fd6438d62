"""Typed settings of the inference service, read from the environment once at start.

A bad value stops start-up with a message that names the variable and the fix (`SettingsError`), before any
worker is forked (gunicorn.conf.py loads them first).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import auth

GS_URI = re.compile(r"^gs://(?P<bucket>[a-z0-9][a-z0-9._-]{1,220}[a-z0-9])/(?P<name>[^#]+?)(?:#(?P<generation>\d+))?$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
WARMUP_EXAMPLE = 'e.g. {"inputs": {"audio": [[0.0, 0.1, ...]]}}, or a path or gs:// object holding one'
SECRET_SETTINGS = {"API_KEYS"}  # never echoed in an error
SHA256_MANIFEST = re.compile(r"^[^=,]+=[0-9a-fA-F]{64}(,[^=,]+=[0-9a-fA-F]{64})*$")


@dataclass(frozen=True)
class ModelSource:
    """Where the model lives: a Cloud Storage object (optionally one generation of it) or a local file."""

    uri: str
    bucket: str | None = None
    name: str | None = None
    generation: int | None = None
    path: Path | None = None

    @property
    def is_gcs(self) -> bool:
        return self.bucket is not None


def parse_model_uri(uri: str) -> ModelSource:
    uri = uri.strip()
    if uri.startswith("gs://"):
        match = GS_URI.match(uri)
        if not match:
            raise ValueError(
                f"MODEL_URI {uri!r} is not of the form gs://BUCKET/PATH/model.onnx (optionally #GENERATION, "
                "e.g. gs://my-models/resnet/model.onnx#1712345678901234)"
            )
        generation = match["generation"]
        return ModelSource(uri, match["bucket"], match["name"], int(generation) if generation else None)
    if "://" in uri:
        raise ValueError(f"MODEL_URI {uri!r}: only gs:// URIs and local file paths are supported")
    path = Path(uri).expanduser()
    if not path.is_file():
        raise ValueError(f"MODEL_URI {uri!r} is neither gs://BUCKET/OBJECT nor an existing local file")
    return ModelSource(uri, path=path.resolve())


class Settings(BaseSettings):
    """Every knob of the service; docs/configuration.md lists the same names."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    model_uri: str = Field(description="gs://BUCKET/OBJECT[#GENERATION] or a local path of the ONNX model")
    model_sha256: str = Field("", description="expected sha256 of the model file; a mismatch means it is never served")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    host: str = Field("0.0.0.0", description="address to listen on; the platforms need 0.0.0.0")
    web_concurrency: int = Field(1, ge=1, le=64, description="gunicorn workers; one per container, scale out instead")
    model_cache_dir: Path = Field(Path("/tmp/model-cache"), description="where the downloaded model is kept")
    model_load_deadline: float = Field(300.0, gt=0, description="seconds to keep retrying the download")
    exit_on_load_failure_after: float = Field(
        30.0, description="seconds a failed load stays visible on /health before the process exits (-1: never exit)"
    )
    ort_intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0: the container's CPUs / workers")
    ort_allow_spinning: bool = Field(False, description="let onnxruntime threads spin between ops (burns idle CPU)")
    inference_threads: int = Field(0, ge=0, description="concurrent session.run calls per worker; 0: same as intra-op threads")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest accepted request body")
    memory_limit_bytes: int = Field(
        0, ge=0, description="the container's memory limit when its cgroup shows none (the lower one wins when both "
        "are set); requests in flight are admitted against it (service/memory.py); 0: the cgroup's only"
    )
    memory_wait_seconds: float = Field(
        2.0, ge=0, le=60, description="how long a request waits for room in the memory budget before its 503"
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info")
    worker_timeout: int = Field(300, ge=0, description="gunicorn heartbeat timeout; must outlast a large model load")
    graceful_timeout: int = Field(8, ge=1, description="seconds in-flight requests get after SIGTERM (Cloud Run: 10)")
    keepalive: int = Field(75, ge=0, description="idle keep-alive seconds (longer than the platform proxy's)")
    shutdown_request_window: float = Field(
        1.0, ge=0, le=30, description="after SIGTERM, seconds an open connection may still deliver a request, which is "
        "answered (with Connection: close); idle connections close after it (service/worker.py)"
    )
    google_cloud_project: str = Field("", description="project id for trace ids in logs")

    # --- cold start (issue 17): large objects as ranged reads, several at a time (service/gcs_download.py) ---
    model_download_concurrency: int = Field(
        8, ge=1, le=32, description="ranged reads of the model's files at a time; 1: one stream per file"
    )
    model_download_slice_bytes: int = Field(
        0, ge=0, description="bytes per ranged read; 0: by object size, 8-64 MiB (a file of one slice or less is "
        "one request)"
    )

    @field_validator("model_download_slice_bytes")
    @classmethod
    def _slice_size(cls, value: int) -> int:
        if 0 < value < 64 * 1024:
            raise ValueError("MODEL_DOWNLOAD_SLICE_BYTES must be 0 (chosen by size) or at least 65536 (64 KiB)")
        return value

    # --- serving: protocol names, adaptive batching (service/scheduler.py) ---
    model_name: str = Field("", description="the model's name in the V2 protocol; default: MODEL_URI's file stem")
    batching: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: batch when the model's self-test passes; on: even if it fails; off: never"
    )
    max_batch_rows: int = Field(64, ge=1, le=65536, description="most rows one batched session.run takes")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="wait up to this for a fuller batch (0: never wait; batches form under load)"
    )
    access_log: Literal["all", "errors", "off"] = Field(
        "errors", description="access-log lines: every request, only answers >= 400, or none (the platforms log "
        "every request themselves; a line per request costs a small model about a tenth of its throughput)"
    )

    # --- Models users bring (issue 11): a real warm-up example ---
    warmup_input: str = Field(
        "", description="a /predict JSON body (inline, a path or gs:// object) run before ready; its failure fails the load"
    )

    # --- Inputs that share a dimension name (service/payload.py, issue 16) ---
    check_shared_dims: bool = Field(
        True, description="refuse a request whose inputs differ in a dimension the model names alike (false: let "
        "onnxruntime broadcast them, for a model whose names are wrong)"
    )

    # --- API keys (service/auth.py, issue 16): a SecretStr, so that no repr or error shows a key ---
    api_keys: SecretStr = Field(
        SecretStr(""), description="comma-separated keys; when set every route but /health and /v2/health/* needs "
        "one (Authorization: Bearer KEY or X-API-Key: KEY)"
    )

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, value: SecretStr) -> SecretStr:
        auth.parse(value.get_secret_value())
        return value

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return auth.parse(self.api_keys.get_secret_value())

    # --- what was built (docs/image.md): set by the image's build args, shown on /health as "build" ---
    build_revision: str = Field("", description="git commit the image was built from (the Dockerfile sets it)")
    build_version: str = Field("", description="the image's version (its tag); set at build")
    build_created: str = Field("", description="when the image was built, RFC 3339; set at build")

    @property
    def build(self) -> dict[str, str | None]:
        return {"revision": self.build_revision or None, "version": self.build_version or None,
                "created": self.build_created or None}

    # --- API documentation (service/openapi.py) ---
    docs: bool = Field(True, description="serve Swagger UI at /docs (/openapi.json is served either way)")

    # ---- keyless Google credentials on Fly.io (service/credentials.py; `invoke gcp.setup --fly` prints them) ----
    gcp_service_account: str = Field("", description="runtime service account the Fly app's identity impersonates")
    gcp_workload_identity_provider: str = Field(
        "", description="projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV: read the bucket "
        "with the Fly machine's OIDC token instead of a key"
    )
    fly_api_socket: str = Field("/.fly/api", description="the Fly machine API socket that mints OIDC tokens")
    gcp_sts_url: str = Field("https://sts.googleapis.com/v1/token", description="Google's token exchange (STS)")
    gcp_iam_credentials_url: str = Field("https://iamcredentials.googleapis.com", description="impersonation API")

    @field_validator("gcp_workload_identity_provider")
    @classmethod
    def _valid_provider(cls, value: str, info) -> str:
        value = value.strip().removeprefix("//iam.googleapis.com/")
        if value and not re.fullmatch(r"projects/\d+/locations/global/workloadIdentityPools/[^/]+/providers/[^/]+",
                                      value):
            raise ValueError("GCP_WORKLOAD_IDENTITY_PROVIDER must be projects/NUMBER/locations/global/"
                             "workloadIdentityPools/POOL/providers/PROVIDER, as `invoke gcp.setup --fly` prints it")
        if value and not (info.data.get("google_cloud_project") or info.data.get("gcp_service_account")):
            raise ValueError("keyless credentials need the project: set GOOGLE_CLOUD_PROJECT (or GCP_SERVICE_ACCOUNT)")
        return value

    @property
    def gcp_project(self) -> str:
        """The project for the storage client: GOOGLE_CLOUD_PROJECT, else the runtime account's own project."""
        account = self.gcp_service_account
        return self.google_cloud_project or account.partition("@")[2].removesuffix(".iam.gserviceaccount.com")

    # --- Prometheus metrics (service/metrics.py), served by the gunicorn master on their own port ---
    metrics_port: int = Field(
        9091, ge=0, le=65535, description="port of /metrics, never the public one; 0: no metrics (HOST is the address)"
    )
    metrics_flush_seconds: float = Field(
        0.1, gt=0, le=60, description="a worker writes its counts for the scrape at most this long after a request"
    )

    @field_validator("log_level", "batching", "access_log", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        value = value.lower() if isinstance(value, str) else value
        return {"true": "all", "1": "all", "yes": "all", "false": "off", "0": "off", "no": "off"}.get(value, value)

    @field_validator("model_uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        parse_model_uri(value)
        return value.strip()

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("MODEL_NAME must be letters, digits, '_', '.' or '-' (it is part of the V2 URL paths)")
        return value

    @field_validator("metrics_port")
    @classmethod
    def _metrics_apart(cls, value: int, info: ValidationInfo) -> int:
        if value and value == info.data.get("port"):
            raise ValueError("METRICS_PORT must differ from PORT: metrics are never served on the public port (0: off)")
        return value

    @field_validator("shutdown_request_window")
    @classmethod
    def _window_within_grace(cls, value: float, info: ValidationInfo) -> float:
        graceful = info.data.get("graceful_timeout")
        if graceful is not None and value >= graceful:
            raise ValueError(f"SHUTDOWN_REQUEST_WINDOW must be shorter than GRACEFUL_TIMEOUT ({graceful} s), which "
                             "also has to cover answering the requests that arrive in it; e.g. 1")
        return value

    @field_validator("model_sha256")
    @classmethod
    def _valid_sha(cls, value: str) -> str:
        value = "".join(value.split())
        if value and not SHA256_HEX.match(value.lower()) and not SHA256_MANIFEST.match(value):
            raise ValueError(
                "MODEL_SHA256 must be 64 hex digits (the output of `sha256sum model.onnx`), or for a model with "
                "external data every file's: model.onnx=HEX,model.onnx.data=HEX; or unset"
            )
        return value.lower() if SHA256_HEX.match(value.lower()) else value

    @field_validator("warmup_input")
    @classmethod
    def _valid_warmup(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("{"):
            try:
                body = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"WARMUP_INPUT is not valid JSON ({exc}): give a /predict body, {WARMUP_EXAMPLE}")
            if not isinstance(body, dict) or "inputs" not in body:
                raise ValueError(f"WARMUP_INPUT must be a /predict body with an \"inputs\" key, {WARMUP_EXAMPLE}")
        elif value.startswith("gs://") and not GS_URI.match(value):
            raise ValueError("WARMUP_INPUT must be of the form gs://BUCKET/PATH/example.json (optionally #GENERATION)")
        return value

    @property
    def sha256_by_file(self) -> dict[str, str]:
        """MODEL_SHA256 by file name; the key "" stands for the .onnx file, whatever its name."""
        if not self.model_sha256:
            return {}
        if "=" not in self.model_sha256:
            return {"": self.model_sha256}
        return {name: digest.lower() for name, digest in (entry.split("=", 1) for entry in self.model_sha256.split(","))}

    @property
    def source(self) -> ModelSource:
        return parse_model_uri(self.model_uri)

    @property
    def served_name(self) -> str:
        """The model's name in the V2 protocol: MODEL_NAME, else the file stem of MODEL_URI's object."""
        if self.model_name:
            return self.model_name
        source = self.source
        leaf = (source.name or "").rsplit("/", 1)[-1] if source.is_gcs else (source.path.name if source.path else "")
        return leaf.removesuffix(".onnx") or "model"

    @property
    def intra_op_threads(self) -> int:
        if self.ort_intra_op_threads:
            return self.ort_intra_op_threads
        return max(1, available_cpus() // self.web_concurrency)

    @property
    def run_threads(self) -> int:
        return self.inference_threads or max(2, self.intra_op_threads)


class SettingsError(Exception):
    """Start-up configuration is wrong; the message says which variable and how to fix it."""


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    if not env.get("MODEL_URI", "").strip():
        raise SettingsError(
            "MODEL_URI is not set: set it to gs://BUCKET/PATH/model.onnx (or a local .onnx file), "
            "e.g. MODEL_URI=models/demo.onnx for the bundled demo model"
        )
    if env.get("PORT", None) == "":
        env.pop("PORT")  # an empty PORT means "the default", as for gunicorn users
    try:
        return Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            message = error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            shown = "not shown" if name in SECRET_SETTINGS else repr(given)
            problems.append(f"{name}: {message} (got {shown})")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


def available_cpus() -> int:
    """CPUs this container may really use: the cgroup quota and the affinity mask, not the host's count.

    onnxruntime's default pool is sized to the host's physical cores and ignores the quota, which
    oversubscribes a Cloud Run or Fly instance (microsoft/onnxruntime#29510).
    """
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    if quota:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
