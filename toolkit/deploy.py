"""`invoke deploy --target T` and `invoke rollback --target T`: one table maps each target to its module."""

from __future__ import annotations

import sys

from invoke import Exit, task

from toolkit import cloudrun, fly, local, release, release_journal, tune_write

TARGETS = {
    "cloudrun": cloudrun,  # Google Cloud Run: revision with no traffic + tag, smoke test, then traffic
    "fly": fly,  # Fly.io: flyctl deploy, smoke test, redeploy the previous image on failure
    "local": local,  # this machine: Docker if an engine answers, else gunicorn; the demo model by default
}
TARGET_HELP = "where to deploy: " + ", ".join(TARGETS)


def _target(name: str):
    try:
        return TARGETS[name]
    except KeyError:
        raise Exit(f"unknown target {name!r}: use one of {', '.join(TARGETS)}") from None


CLOUDRUN_ONLY = "Cloud Run only: "


@task(
    help={
        "target": TARGET_HELP,
        "tag": "image tag / release label (default: the git commit)",
        "dry_run": "print every command instead of running it",
        "declarative": CLOUDRUN_ONLY + "apply a rendered service.yaml with `gcloud run services replace` "
                       "(default: cloudrun.declarative)",
        "model_mount": CLOUDRUN_ONLY + "mount the model's bucket read-only instead of downloading the model "
                       "(default: cloudrun.model_mount)",
    }
)
def deploy(c, target="local", tag="", dry_run=False, declarative=False, model_mount=False):
    """Build, push and deploy the service to TARGET, then prove it serves the model with the smoke test."""
    module = _target(target)
    dry_run = dry_run or c.config.run.dry  # --dry-run or invoke's global --dry
    if c.deploy.require_scan and target == "fly":
        raise Exit("deploy.require_scan gates on Artifact Analysis, which scans Artifact Registry images only, and "
                   "Fly's registry has no scanner: scan the image there with `invoke image.scan`, or set "
                   "deploy.require_scan to false for Fly deploys.")
    release_journal.warn_if_unreleased_model(c, target)
    if hint := tune_write.sizing_hint(c, target):
        print(hint, file=sys.stderr)
    if target == "cloudrun":
        module.deploy(c, tag=tag, dry_run=dry_run, declarative=declarative, model_mount=model_mount)
        return
    if declarative or model_mount:
        raise Exit(f"--declarative and --model-mount are Cloud Run options; target {target!r} takes neither")
    module.deploy(c, tag=tag, dry_run=dry_run)


@task(
    help={
        "target": "cloudrun (the only target with a service manifest; Fly's is fly.toml)",
        "tag": "image tag to put in it (default: the git commit)",
        "output": "file to write (default: cloudrun.manifest, service.yaml)",
        "model_mount": "mount the model's bucket instead of downloading the model (default: cloudrun.model_mount)",
    }
)
def render(c, target="cloudrun", tag="", output="", model_mount=False):
    """Write the Cloud Run service as a Knative service.yaml: everything a deploy sets, to review and apply."""
    module = _target(target)
    if not hasattr(module, "render"):
        raise Exit(f"target {target!r} has no manifest to render: use --target cloudrun")
    module.render(c, tag=tag, output=output, model_mount=model_mount)


@task(
    help={
        "target": "cloudrun or fly",
        "to": "revision (Cloud Run) or image (Fly) to go back to; default: where a held or interrupted `invoke "
              "release` started (the journal's stable revision, or image and env), else the model before the last "
              "release, else the revision or image before the current",
        "dry_run": "print every command instead of running it",
    }
)
def rollback(c, target, to="", dry_run=False):
    """Go back to where an unfinished or the last release started, else the previous revision or image."""
    module = _target(target)
    if not hasattr(module, "rollback"):
        raise Exit(f"target {target!r} has nothing to roll back: redeploy it instead")
    dry_run = dry_run or c.config.run.dry
    if not to and release.rollback_release(c, target, dry_run):  # after `invoke release`: the previous model
        return
    module.rollback(c, to=to, dry_run=dry_run)
