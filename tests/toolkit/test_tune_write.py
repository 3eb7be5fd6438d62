"""`invoke tune --write` edits: on copies of the project's own invoke.yaml and fly.toml, exactly the keys named
change, every comment stays, a rerun replaces its own comment, and the deploys read what was written."""

from __future__ import annotations

import tomllib

import pytest
import yaml
from invoke import Exit

from tests.image.tasks_cli import run_invoke
from tests.support.models import ROOT
from toolkit import tune_write

CLOUDRUN = {"cpu": "2", "memory": "768Mi", "concurrency": 12}
FLY = {"http_service.concurrency": {"soft_limit": 3, "hard_limit": 6}, "[vm]": {"size": "performance-1x", "memory": "2gb"}}


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def test_invoke_yaml_gets_exactly_the_cloudrun_keys_and_keeps_every_comment():
    before = (ROOT / "invoke.yaml").read_text()
    after = tune_write.set_yaml_keys(before, "cloudrun", CLOUDRUN, "# invoke tune RUN-1")
    old, new = yaml.safe_load(before), yaml.safe_load(after)
    assert new.pop("cloudrun") == CLOUDRUN
    assert new == old
    assert comments(after) == comments(before) + ["# invoke tune RUN-1"]
    # a second run replaces the first one's values and comment
    again = tune_write.set_yaml_keys(after, "cloudrun", {**CLOUDRUN, "concurrency": 40}, "# invoke tune RUN-2")
    assert yaml.safe_load(again)["cloudrun"]["concurrency"] == 40
    assert comments(again) == comments(before) + ["# invoke tune RUN-2"]


def test_an_existing_cloudrun_section_keeps_its_other_keys_and_their_comments():
    text = "model:\n  uri: gs://b/m.onnx\ncloudrun:\n  service: svc   # the name\n  concurrency: 16  # old guess\n" \
           "  public: true\ngcp:\n  project: p\n"
    after = tune_write.set_yaml_keys(text, "cloudrun", CLOUDRUN, "# invoke tune RUN")
    assert yaml.safe_load(after)["cloudrun"] == {"service": "svc", "public": True, **CLOUDRUN}
    assert "  concurrency: 12  # old guess\n" in after and "  service: svc   # the name\n" in after
    assert yaml.safe_load(after)["gcp"] == {"project": "p"}


def test_a_flow_style_section_is_not_rewritten():
    with pytest.raises(Exit, match="not a block mapping"):
        tune_write.set_yaml_keys("cloudrun: {cpu: 1}\n", "cloudrun", CLOUDRUN, "# invoke tune RUN")


def test_fly_toml_gets_exactly_the_limits_and_vm_and_keeps_every_comment():
    before = (ROOT / "fly.toml").read_text()
    after = tune_write.set_toml_keys(before, FLY, "# invoke tune RUN-1")
    old, new = tomllib.loads(before), tomllib.loads(after)
    assert new["http_service"]["concurrency"] == {**old["http_service"]["concurrency"], "soft_limit": 3, "hard_limit": 6}
    assert new["vm"] == [{"size": "performance-1x", "memory": "2gb"}]
    new["http_service"]["concurrency"], new["vm"] = old["http_service"]["concurrency"], old["vm"]
    assert new == old
    # one run comment above each edited table's keys, every other comment as it was
    assert [c for c in comments(after) if c != "# invoke tune RUN-1"] == comments(before)
    assert comments(after).count("# invoke tune RUN-1") == 2
    again = tune_write.set_toml_keys(after, FLY, "# invoke tune RUN-2")
    assert comments(again).count("# invoke tune RUN-2") == 2 and "# invoke tune RUN-1" not in comments(again)


def test_deploys_read_what_tune_wrote(tmp_path):
    """`invoke render` builds the Cloud Run service from the same config as `invoke deploy`."""
    record = tmp_path / "invoke.yaml"
    text = (ROOT / "invoke.yaml").read_text().replace("uri: models/demo.onnx ", "uri: gs://bucket/m.onnx")
    record.write_text(tune_write.set_yaml_keys(text, "cloudrun", CLOUDRUN, "# invoke tune RUN"))
    manifest = tmp_path / "service.yaml"
    done = run_invoke("-f", str(record), "render", "--tag", "t1", "--output", str(manifest), GCP_PROJECT="p")
    assert done.returncode == 0, done.stdout + done.stderr
    spec = yaml.safe_load(manifest.read_text())["spec"]["template"]["spec"]
    assert spec["containerConcurrency"] == 12
    assert spec["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "768Mi"}


def test_a_deploy_names_tune_until_tune_wrote_the_settings(tmp_path):
    """Sizing is the step before a first deploy: the deploy says so while the settings are the defaults."""
    record = tmp_path / "invoke.yaml"
    record.write_text((ROOT / "invoke.yaml").read_text())
    before = run_invoke("-f", str(record), "deploy", "--target", "cloudrun", "--dry-run")
    assert "`invoke tune --target cloudrun --write`" in before.stderr, before.stderr
    record.write_text(tune_write.set_yaml_keys(record.read_text(), "cloudrun", CLOUDRUN, tune_write.MARK + "RUN"))
    after = run_invoke("-f", str(record), "deploy", "--target", "cloudrun", "--dry-run")
    assert "invoke tune" not in after.stderr, after.stderr
