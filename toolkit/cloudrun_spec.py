"""What a Cloud Run revision of the service is made of, whichever way it is deployed (flags in `cloudrun.py`, a
Knative service.yaml in `cloudrun_yaml.py`): the port, the startup probe, the environment and the model volume."""

from __future__ import annotations

import math

from invoke import Context, Exit

from toolkit.model import model_env

PROBE_PERIOD_SECONDS = 10
PORT = 8080
VOLUME = "model"  # the Cloud Storage volume of --model-mount, mounted read-only at MOUNT_PATH
MOUNT_PATH = "/mnt/models"


def env_vars(c: Context, model_mount: bool = False) -> dict[str, str]:
    env = {**model_env(c), "WEB_CONCURRENCY": "1", "GOOGLE_CLOUD_PROJECT": c.gcp.project}
    if model_mount:  # the service opens the mounted file as a local one: nothing to download
        env["MODEL_URI"] = mounted_model_path(c)
    cpus = float(c.cloudrun.cpu)
    if cpus >= 1:  # one onnxruntime thread per vCPU the instance really has
        env["ORT_INTRA_OP_THREADS"] = str(int(cpus))
    return env


def probe(c: Context) -> dict:
    """The startup probe, as the v1 API has it. Its window (period x failures) must cover downloading and opening
    the model; /health answers 503 until then, and the instance gets traffic only after it answers 200."""
    failures = max(3, math.ceil(int(c.cloudrun.startup_probe_seconds) / PROBE_PERIOD_SECONDS))
    return {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": PROBE_PERIOD_SECONDS, "timeoutSeconds": 5,
            "failureThreshold": failures}


def startup_probe(c: Context) -> str:
    """The same probe in `gcloud run deploy --startup-probe` form."""
    p = probe(c)
    return (f"httpGet.path={p['httpGet']['path']},httpGet.port={PORT},periodSeconds={p['periodSeconds']},"
            f"timeoutSeconds={p['timeoutSeconds']},failureThreshold={p['failureThreshold']}")


def mounted_model_path(c: Context) -> str:
    """Where the model's object appears when its bucket is mounted (--model-mount)."""
    source = str(c.model.uri)
    if "#" in source:
        raise Exit(f"model.uri {source!r} pins a generation, which a mounted bucket cannot: a mount shows the current "
                   "object, so drop #GENERATION and pin the content with model.sha256 instead.")
    return f"{MOUNT_PATH}/{source[len('gs://'):].split('/', 1)[1]}"
