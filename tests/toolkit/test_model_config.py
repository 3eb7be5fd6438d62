"""toolkit/model.py: the service's environment for the configured model, and the refusal of a local model for a
cloud target, which names the fix."""

from __future__ import annotations

import pytest
from invoke import Config, Context, Exit

from toolkit.defaults import DEFAULTS
from toolkit.model import model_env, require_gcs_model


def context(**model: str) -> Context:
    config = Config(defaults=DEFAULTS)
    config.model.update(model)
    return Context(config)


def test_the_environment_carries_the_uri_and_the_digest_only_when_one_is_expected():
    assert model_env(context()) == {"MODEL_URI": "models/demo.onnx"}
    pinned = context(uri="gs://b/m.onnx#17", sha256="ab" * 32)
    assert model_env(pinned) == {"MODEL_URI": "gs://b/m.onnx#17", "MODEL_SHA256": "ab" * 32}


def test_a_cloud_target_refuses_a_local_model_saying_how_to_upload_it():
    with pytest.raises(Exit) as refused:
        require_gcs_model(context(uri="models/demo.onnx"), "Cloud Run")
    message = str(refused.value.message)
    assert "'models/demo.onnx'" in message and "Cloud Run downloads the model" in message
    assert "gcloud storage cp model.onnx gs://BUCKET/model.onnx" in message
    require_gcs_model(context(uri="gs://b/m.onnx"), "Fly")  # a gs:// model passes
