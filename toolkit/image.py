"""The container image: build it with a Docker engine and push it to the target's registry.

The image ref is REPOSITORY:TAG. The repository is `image.registry`/`image.name` when a registry is set;
otherwise it follows the target: Artifact Registry for cloudrun, the app's repository on registry.fly.io for fly,
and plain `image.name` for local. The tag is --tag, else `image.tag`, else the git commit.

Every build records where it came from (docs/image.md, "Supply chain"): OCI labels (source, revision, created, version,
base name and digest), the same revision in the image's environment for /health, and a CycloneDX SBOM of the
image's Python environment written beside the build. Git is always asked in the project's folder, whatever the
caller's working directory (`invoke -r PROJECT ...`).
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from invoke import Context, Exit, Result, task

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("local", "cloudrun", "fly")
REMOTE_BUILD_HINT = (
    "or build remotely: `invoke deploy --target cloudrun` with cloudrun.build=cloudbuild, "
    "or `invoke deploy --target fly` with fly.build=remote (Fly's builder)"
)

CLOUD_TARGETS = ("cloudrun", "fly")  # pushes there refuse a -dirty revision unless --allow-dirty
OCI = "org.opencontainers.image."
SBOM_DOCKERFILE = ROOT / "toolkit" / "sbom.Dockerfile"
SBOM_LOCK = ROOT / "requirements-sbom.txt"
CREDENTIALS_IN_URL = re.compile(r"//[^/@]+@")

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
    return revision(c, short=True)


def revision(c: Context, short: bool = False) -> str:
    """The project's git commit (full sha, or short), with -dirty when its work tree has uncommitted changes."""
    head = git(c, "rev-parse", *(["--short"] if short else []), "HEAD")
    if not head.ok:
        raise Exit("No git commit to tag the image with: commit first, or pass --tag (or set image.tag).")
    changes = git(c, "status", "--porcelain").stdout.strip()
    return head.stdout.strip() + ("-dirty" if changes else "")


def git(c: Context, *args: str) -> Result:
    """git in the project's folder (never the caller's working directory), read-only, even under --dry."""
    return c.run(shlex.join(["git", "-C", str(ROOT), *args]), hide=True, warn=True, dry=False)


def source_url(c: Context) -> str:
    """image.source, else the project's git remote `origin` (without credentials)."""
    if c.image.source:
        return c.image.source
    remote = git(c, "config", "--get", "remote.origin.url")
    return CREDENTIALS_IN_URL.sub("//", remote.stdout.strip()) if remote.ok else ""


@dataclass(frozen=True)
class Base:
    """The base image a build used: `name` as configured, `digest` it resolved to, `ref` what FROM was given."""

    name: str
    digest: str  # sha256:...; "" only in a dry run of a base not pinned by digest
    ref: str


def resolve_base(c: Context, base_image: str, dry_run: bool) -> Base:
    """Pin the base for this build: a NAME@sha256:DIGEST as is; a tag to the registry digest it stands for here
    (pulled first when missing); a local-only image (never pushed or pulled) to its image ID."""
    name, _, digest = base_image.partition("@")
    if dry_run:
        return Base(name, digest, base_image)
    info = _inspect(c, base_image)
    if info is None:
        pulled = c.run(shlex.join(["docker", "pull", "--platform", c.image.platform, base_image]), warn=True, hide="out")
        info = _inspect(c, base_image) if pulled.ok else None
        if info is None:
            raise Exit(f"Cannot pull the base image {base_image}: check its name (image.base_image), log in to its "
                       "registry, or point image.base_image at a mirror.")
    if digest:
        print(f"base image {name} pinned at {digest}")
        return Base(name, digest, base_image)
    for repo_digest in info.get("RepoDigests") or []:
        repo, _, found = repo_digest.partition("@")
        print(f"base image {name} resolved to {found}; pin it with image.base_image: {repo}@{found}")
        return Base(name, found, repo_digest)
    print(f"base image {name} is a local image with no registry digest: recording its image ID {info['Id']}")
    return Base(name, info["Id"], base_image)


def _inspect(c: Context, ref: str) -> dict | None:
    found = c.run(shlex.join(["docker", "image", "inspect", "--format", "{{json .}}", ref]), hide=True, warn=True, dry=False)
    return json.loads(found.stdout) if found.ok else None


def build_args(c: Context, tag: str) -> dict[str, str]:
    """The Dockerfile's BUILD_* arguments: what the image's /health shows as "build" (also for Fly's builder)."""
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {"BUILD_REVISION": revision(c), "BUILD_VERSION": tag, "BUILD_CREATED": created}


def oci_labels(c: Context, args: dict[str, str], base: Base) -> dict[str, str]:
    """The OCI annotations every build carries (https://github.com/opencontainers/image-spec/blob/main/annotations.md)."""
    labels = {"source": source_url(c), "revision": args["BUILD_REVISION"], "created": args["BUILD_CREATED"],
              "version": args["BUILD_VERSION"], "base.name": base.name, "base.digest": base.digest}  # fmt: skip
    return {OCI + key: value for key, value in labels.items() if value}


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


def build_command(c: Context, ref: str, base: Base, args: dict[str, str], labels: dict[str, str]) -> list[str]:
    command = [*_docker_build(c, base), "--tag", ref]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    for key, value in labels.items():
        command += ["--label", f"{key}={value}"]
    return [*command, str(ROOT)]


def _docker_build(c: Context, base: Base) -> list[str]:
    command = ["docker", "build", "--platform", c.image.platform, "--build-arg", f"BASE_IMAGE={base.ref}"]
    if c.image.pip_index_url:
        command += ["--build-arg", f"PIP_INDEX_URL={c.image.pip_index_url}"]
    if c.image.build_network:
        command += ["--network", c.image.build_network]
    return command


def sbom_path(c: Context, ref: str, sbom: str | None = None) -> Path | None:
    """Where the SBOM of image `ref` goes: --sbom, else image.sbom_dir/NAME_TAG.cdx.json; None when turned off."""
    if sbom:
        return Path(sbom)
    if not c.image.sbom_dir:
        return None
    return ROOT / c.image.sbom_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", ref.rsplit("/", 1)[-1]) + ".cdx.json")


def write_sbom(c: Context, ref: str, base: Base, labels: dict[str, str], path: Path, dry_run: bool) -> None:
    """CycloneDX JSON of the image's Python environment, made by cyclonedx-bom in a throw-away copy of the image,
    with the image and its base recorded in `metadata`."""
    scratch = f"{ref.rsplit(':', 1)[0]}-sbom:scratch"
    with tempfile.TemporaryDirectory(prefix="onnx-serve-sbom-") as context:
        (Path(context) / SBOM_LOCK.name).write_bytes(SBOM_LOCK.read_bytes())
        command = [*_docker_build(c, base), "--file", str(SBOM_DOCKERFILE), "--build-arg", f"IMAGE={ref}",
                   "--tag", scratch, context]  # fmt: skip
        made = c.run(shlex.join(command), dry=dry_run, hide="out", warn=True)
        if not made.ok:
            reason = (made.stderr.strip().splitlines() or ["no output"])[-1]
            raise Exit(f"The image {ref} is built, but its SBOM is not ({reason}): the generator installs from PyPI "
                       "(or image.pip_index_url) inside `docker build`; set image.sbom_dir to '' to build without one.")
    if dry_run:
        print(f"# then: docker run {scratch} cat /sbom.cdx.json > {path}")
        return
    try:
        made = c.run(shlex.join(["docker", "run", "--rm", "--network", "none", "--entrypoint", "cat", scratch,
                                 "/sbom.cdx.json"]), hide=True)  # fmt: skip
    finally:
        c.run(shlex.join(["docker", "rmi", "--no-prune", scratch]), hide=True, warn=True)  # keep the generator's cache
    bom = json.loads(made.stdout)
    metadata = bom.setdefault("metadata", {})
    metadata["component"] = {"type": "container", "bom-ref": "image", "name": ref.rsplit(":", 1)[0],
                             "version": labels.get(OCI + "version", "")}  # fmt: skip
    metadata["properties"] = [*metadata.get("properties", []),
                              *({"name": key, "value": value} for key, value in labels.items())]  # fmt: skip
    bom.setdefault("components", []).append({"type": "container", "bom-ref": "base-image", "name": base.name,
                                             "version": base.digest, "description": "the image's base"})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bom, indent=2) + "\n")
    print(f"SBOM ({len(bom['components']) - 1} Python packages, CycloneDX {bom.get('specVersion')}): {path}")


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
    if not dry_run:
        refuse_dirty_push(c, target, revision(c), c.image.allow_dirty)  # before the slow build
    build(c, target=target, tag=tag, dry_run=dry_run)
    return push(c, target=target, tag=tag, dry_run=dry_run)


def refuse_dirty_push(c: Context, target: str, built_from: str, allow_dirty: bool) -> None:
    if target in CLOUD_TARGETS and built_from.endswith("-dirty") and not allow_dirty:
        raise Exit(f"The image comes from uncommitted changes ({built_from}): its revision label could not say what "
                   "it runs. Commit first, or pass --allow-dirty (image.allow_dirty) to push it anyway.")


@task(
    help={
        "target": TARGET_HELP,
        "tag": TAG_HELP,
        "base_image": "image to build on, NAME:TAG or NAME@sha256:DIGEST (default: image.base_image)",
        "sbom": "where to write the image's CycloneDX SBOM (default: image.sbom_dir/NAME_TAG.cdx.json)",
        "dry_run": DRY_RUN_HELP,
    }
)
def build(c, target="local", tag=None, base_image=None, sbom=None, dry_run=False):
    """Build the service's image with the local Docker engine, with OCI labels and an SBOM."""
    dry_run = dry_run or c.config.run.dry  # `invoke --dry image.build` too
    tag = tag or c.image.tag or default_tag(c)
    ref = image_ref(c, target, tag)
    if not dry_run:
        require_engine(c)
    base = resolve_base(c, base_image or c.image.base_image, dry_run)
    args = build_args(c, tag)
    labels = oci_labels(c, args, base)
    c.run(shlex.join(build_command(c, ref, base, args, labels)), dry=dry_run)
    path = sbom_path(c, ref, sbom)
    if path:
        write_sbom(c, ref, base, labels, path, dry_run)
    return ref


@task(
    help={
        "target": TARGET_HELP,
        "tag": TAG_HELP,
        "allow_dirty": "push an image built from uncommitted changes to Artifact Registry or Fly (default: refuse)",
        "dry_run": DRY_RUN_HELP,
    }
)
def push(c, target="local", tag=None, allow_dirty=False, dry_run=False):
    """Push the built image to the target's registry, and its SBOM where the registry takes one."""
    dry_run = dry_run or c.config.run.dry
    if target == "local" and not c.image.registry:
        raise Exit("Nothing to push to: pass --target cloudrun or fly, or set image.registry (INVOKE_IMAGE_REGISTRY).")
    ref = image_ref(c, target, tag)
    if not dry_run:
        require_engine(c)
        info = _inspect(c, ref)
        if info is None:
            tag = ref.rsplit(":", 1)[1]
            raise Exit(f"No image {ref} here: build it first with `invoke image.build --target {target} --tag {tag}`.")
        built_from = (info.get("Config", {}).get("Labels") or {}).get(OCI + "revision", "")
        refuse_dirty_push(c, target, built_from, allow_dirty or c.image.allow_dirty)
    if not c.run(shlex.join(push_command(ref)), warn=True, dry=dry_run).ok:
        raise Exit(f"docker push {ref} failed: log in to the registry with {login_hint(c, target)} and retry.")
    attach_sbom(c, target, ref, dry_run)
    return ref


def attach_sbom(c: Context, target: str, ref: str, dry_run: bool) -> None:
    """Artifact Registry stores an SBOM beside the image (`gcloud artifacts sbom load`: CycloneDX 1.4/1.5 or SPDX,
    kept in Cloud Storage with a reference occurrence); registry.fly.io has no such API, so there it stays local."""
    path = sbom_path(c, ref)
    if path is None or not (dry_run or path.is_file()):
        return
    if target != "cloudrun" or c.image.registry:
        print(f"SBOM kept at {path}: this registry takes no SBOM attachment")
        return
    digest = "@sha256:DIGEST" if dry_run else next(
        (d[d.index("@"):] for d in (_inspect(c, ref) or {}).get("RepoDigests", []) if d.startswith(ref.rsplit(":", 1)[0])), "")
    if not digest:
        print(f"SBOM kept at {path}: the pushed digest of {ref} is unknown here")
        return
    command = ["gcloud", "artifacts", "sbom", "load", "--project", c.gcp.project, "--source", str(path),
               "--uri", ref.rsplit(":", 1)[0] + digest]  # fmt: skip
    if not c.run(shlex.join(command), warn=True, dry=dry_run).ok:
        print(f"warning: the SBOM was not attached (needs the Container Analysis API); it stays at {path}")
