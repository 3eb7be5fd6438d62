"""The container image: build it with a Docker engine and push it to the target's registry.

The image ref is REPOSITORY:TAG. The repository is `image.registry`/`image.name` when a registry is set;
otherwise it follows the target: Artifact Registry for cloudrun, the app's repository on registry.fly.io for fly,
and plain `image.name` for local. The tag is --tag, else `image.tag`, else the git commit.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from invoke import Context, Exit, Result, task

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("local", "cloudrun", "fly")
REMOTE_BUILD_HINT = (
    "or build remotely: `invoke deploy --target cloudrun` with cloudrun.build=cloudbuild, "
    "or `invoke deploy --target fly` with fly.build=remote (Fly's builder)"
)

TARGET_HELP = "where the image goes: local (no registry), cloudrun (Artifact Registry) or fly (registry.fly.io)"
TAG_HELP = "image tag (default: image.tag, else the git short sha, with -dirty for uncommitted changes)"
DRY_RUN_HELP = "print the docker commands instead of running them (needs no Docker engine)"


def image_ref(c: Context, target: str = "local", tag: str | None = None) -> str:
    """REPOSITORY:TAG of the image for `target`; what deploy tasks hand to the platform."""
    return f"{repository(c, target)}:{tag or c.image.tag or default_tag(c)}"


def repository(c: Context, target: str) -> str:
    if target not in TARGETS:
        raise Exit(f"--target must be one of {', '.join(TARGETS)} (got {target!r}).")
    if c.image.registry:
        return f"{c.image.registry.rstrip('/')}/{c.image.name}"
    if target == "cloudrun":
        if not c.gcp.project:
            raise Exit("gcp.project is not set: put `gcp: {project: MY-PROJECT}` in invoke.yaml or set INVOKE_GCP_PROJECT.")
        return f"{c.gcp.region}-docker.pkg.dev/{c.gcp.project}/{c.gcp.repository}/{c.image.name}"
    if target == "fly":
        if not c.fly.app:
            raise Exit("fly.app is not set: put `fly: {app: MY-APP}` in invoke.yaml or set INVOKE_FLY_APP.")
        return f"registry.fly.io/{c.fly.app}"  # Fly's registry has one repository per app, named after it
    return c.image.name


def default_tag(c: Context) -> str:
    """The git short sha of HEAD, with -dirty when the work tree has uncommitted changes."""
    head = c.run("git rev-parse --short HEAD", hide=True, warn=True, dry=False)
    if not head.ok:
        raise Exit("No git commit to tag the image with: commit first, or pass --tag (or set image.tag).")
    changes = c.run("git status --porcelain", hide=True, dry=False).stdout.strip()
    return head.stdout.strip() + ("-dirty" if changes else "")


def engine_answers(c: Context) -> bool:
    return _server_version(c).ok


def require_engine(c: Context) -> None:
    result = _server_version(c)
    if result.ok:
        return
    if result.exited == 127:
        raise Exit(f"No docker CLI on this system: install Docker, {REMOTE_BUILD_HINT}.")
    reason = (result.stderr.strip().splitlines() or ["no answer"])[-1]
    raise Exit(f"No Docker engine answers ({reason}): start one or point DOCKER_HOST at one, {REMOTE_BUILD_HINT}.")


def _server_version(c: Context) -> Result:
    return c.run("docker version --format '{{.Server.Version}}'", hide=True, warn=True, dry=False)


def build_command(c: Context, ref: str, base_image: str | None = None) -> list[str]:
    command = ["docker", "build", "--platform", c.image.platform, "--tag", ref,
               "--build-arg", f"BASE_IMAGE={base_image or c.image.base_image}"]  # fmt: skip
    if c.image.pip_index_url:
        command += ["--build-arg", f"PIP_INDEX_URL={c.image.pip_index_url}"]
    if c.image.build_network:
        command += ["--network", c.image.build_network]
    return [*command, str(ROOT)]


def push_command(ref: str) -> list[str]:
    return ["docker", "push", ref]


def login_hint(c: Context, target: str) -> str:
    if c.image.registry:
        return f"`docker login {c.image.registry.split('/')[0]}`"
    if target == "cloudrun":
        return f"`gcloud auth configure-docker {c.gcp.region}-docker.pkg.dev`"
    return "`flyctl auth docker`"


def build_and_push(c: Context, target: str, tag: str | None, dry_run: bool) -> str:
    """Build the image for `target` and push it; returns its ref."""
    tag = tag or c.image.tag or default_tag(c)
    build(c, target=target, tag=tag, dry_run=dry_run)
    return push(c, target=target, tag=tag, dry_run=dry_run)


@task(
    help={
        "target": TARGET_HELP,
        "tag": TAG_HELP,
        "base_image": "image to build on (default: image.base_image, python:3.12-slim)",
        "dry_run": DRY_RUN_HELP,
    }
)
def build(c, target="local", tag=None, base_image=None, dry_run=False):
    """Build the service's image with the local Docker engine."""
    dry_run = dry_run or c.config.run.dry  # `invoke --dry image.build` too
    ref = image_ref(c, target, tag)
    if not dry_run:
        require_engine(c)
    c.run(shlex.join(build_command(c, ref, base_image)), dry=dry_run)
    return ref


@task(help={"target": TARGET_HELP, "tag": TAG_HELP, "dry_run": DRY_RUN_HELP})
def push(c, target="local", tag=None, dry_run=False):
    """Push the built image to the target's registry."""
    dry_run = dry_run or c.config.run.dry
    if target == "local" and not c.image.registry:
        raise Exit("Nothing to push to: pass --target cloudrun or fly, or set image.registry (INVOKE_IMAGE_REGISTRY).")
    ref = image_ref(c, target, tag)
    if not dry_run:
        require_engine(c)
        if not c.run(shlex.join(["docker", "image", "inspect", ref]), hide=True, warn=True).ok:
            tag = ref.rsplit(":", 1)[1]
            raise Exit(f"No image {ref} here: build it first with `invoke image.build --target {target} --tag {tag}`.")
    if not c.run(shlex.join(push_command(ref)), warn=True, dry=dry_run).ok:
        raise Exit(f"docker push {ref} failed: log in to the registry with {login_hint(c, target)} and retry.")
    return ref
