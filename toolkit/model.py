"""The model every target serves, from config: the service's environment for it, and the check that a cloud
target can reach it."""

from __future__ import annotations

from invoke import Context, Exit


def model_env(c: Context) -> dict[str, str]:
    """MODEL_URI, and MODEL_SHA256 when one is expected: what every target passes to the service."""
    env = {"MODEL_URI": str(c.model.uri)}
    if c.model.sha256:
        env["MODEL_SHA256"] = c.model.sha256
    return env


def require_gcs_model(c: Context, platform: str) -> None:
    if not str(c.model.uri).startswith("gs://"):
        raise Exit(
            f"model.uri is {c.model.uri!r}: {platform} downloads the model from Cloud Storage at start, so upload "
            "it (`gcloud storage cp model.onnx gs://BUCKET/model.onnx`) and set model.uri to that gs:// URI."
        )
