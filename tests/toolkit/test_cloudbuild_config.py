"""cloudbuild.yaml: valid against the shared Cloud Build schema, asking for verified provenance of the image it
pushes, and labelling the image as `invoke image.build` does (its substitutions are checked by the gcloud stub in
the Cloud Build deploy tests)."""

from __future__ import annotations

import json

import jsonschema
import yaml

from tests.support.models import ROOT

SCHEMA = ROOT.parent / "shared" / "schemas" / "cloudbuild.schema.json"
OCI_LABELS = ("revision", "version", "created", "base.name", "base.digest")


def test_cloudbuild_yaml_validates_and_requests_verified_provenance_for_the_image_it_pushes():
    config = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(config)
    assert config["options"]["requestedVerifyOption"] == "VERIFIED"
    pushed = next(step for step in config["steps"] if step["id"] == "push")["args"][-1]
    assert config["images"] == [pushed]  # provenance is generated for the images listed here


def test_the_cloud_build_image_carries_the_same_labels_and_a_base_pinned_by_digest():
    config = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    script = next(step for step in config["steps"] if step["id"] == "build")["args"][-1]
    for label in OCI_LABELS:
        assert f'--label="org.opencontainers.image.{label}=' in script
    assert '--build-arg="BASE_IMAGE=$${base}"' in script  # the digest the pull resolved, not the tag
    assert "BUILD_REVISION=${_REVISION}" in script
