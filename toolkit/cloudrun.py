"""Cloud Run: build (locally or on Cloud Build), deploy a revision with no traffic and a tag, smoke-test the tag's
URL, and only then move traffic to it. Every gcloud command is built in one function here, from config.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time

from invoke import Context, Exit

from toolkit import cloudrun_yaml, image, scan, smoke
from toolkit.cloudrun_spec import MOUNT_PATH, PORT, VOLUME, env_vars, mounted_model_path, startup_probe
from toolkit.gcp import model_bucket, require_runtime_account, runtime_account
from toolkit.model import require_gcs_model


def require_project(c: Context) -> None:
    if not c.gcp.project:
        raise Exit("gcp.project is not set: put `gcp: {project: MY-PROJECT}` in invoke.yaml or set INVOKE_GCP_PROJECT.")


def check_ready(c: Context, dry_run: bool) -> None:
    """Cheap checks first: config set, gcloud present and logged in, a model Cloud Run can reach."""
    require_project(c)
    require_gcs_model(c, "Cloud Run")
    if not dry_run:
        check_gcloud(c)


def check_gcloud(c: Context) -> None:
    """gcp.project set, gcloud on PATH and logged in: what every command that reads or changes the service needs."""
    require_project(c)
    if not shutil.which("gcloud"):
        raise Exit("gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install).")
    if not c.run("gcloud auth print-access-token", hide=True, warn=True).ok:
        raise Exit("gcloud has no credentials: run `gcloud auth login` (or set a service account) first.")


def where(c: Context) -> list[str]:
    return ["--project", c.gcp.project, "--region", c.gcp.region]


def volume_flags(c: Context) -> list[str]:
    """The model's bucket as a read-only Cloud Storage volume (gen2 only: network file systems need it)."""
    return ["--clear-volumes", "--clear-volume-mounts",
            "--add-volume", f"name={VOLUME},type=cloud-storage,bucket={model_bucket(c)},readonly=true",
            "--add-volume-mount", f"volume={VOLUME},mount-path={MOUNT_PATH}"]


def deploy_command(c: Context, image_ref: str, tag: str | None, model_mount: bool = False) -> list[str]:
    """`gcloud run deploy`: a new service when tag is None, else a revision with no traffic and that tag."""
    cr = c.cloudrun
    env = env_vars(c, model_mount)
    command = [
        "gcloud", "run", "deploy", cr.service, "--image", image_ref, *where(c),
        "--port", str(PORT),
        "--cpu", str(cr.cpu), "--memory", str(cr.memory),
        "--concurrency", str(cr.concurrency),
        "--min-instances", str(cr.min_instances), "--max-instances", str(cr.max_instances),
        "--timeout", str(cr.timeout),
        # A custom delimiter, so that values may hold commas.
        "--set-env-vars", "^@^" + "@".join(f"{k}={v}" for k, v in env.items()),
        "--startup-probe", startup_probe(c),
        "--cpu-boost",
        "--execution-environment", "gen2",
        "--allow-unauthenticated" if cr.public else "--no-allow-unauthenticated",
        # the least-privilege account `invoke gcp.setup` made, never the project-Editor compute default
        "--service-account", runtime_account(c),
        "--quiet",
    ]  # fmt: skip
    if model_mount:
        command += volume_flags(c)
    if cr.api_keys_secret:
        command += ["--update-secrets", f"API_KEYS={cr.api_keys_secret}:latest"]
    if tag:
        command += ["--no-traffic", "--tag", tag]
    return command


def cloudbuild_command(c: Context, tag: str) -> list[str]:
    """Build and push on Cloud Build (no local Docker); the invoke task deploys, so the file's deploy step is off."""
    substitutions = {
        "_REGION": c.gcp.region, "_REPOSITORY": c.gcp.repository, "_IMAGE": c.image.name,
        "_TAG": tag, "_SERVICE": c.cloudrun.service, "_DEPLOY": "false",
        "_BASE_IMAGE": c.image.base_image, "_REVISION": image.revision(c),  # for the image's OCI labels
    }  # fmt: skip
    return [
        "gcloud", "builds", "submit", "--project", c.gcp.project, "--config", "cloudbuild.yaml",
        "--substitutions", ",".join(f"{k}={v}" for k, v in substitutions.items()), ".",
    ]  # fmt: skip


def describe(c: Context) -> dict | None:
    """The service as Cloud Run has it, or None when it does not exist yet."""
    command = ["gcloud", "run", "services", "describe", c.cloudrun.service, *where(c), "--format", "json"]
    result = c.run(shlex.join(command), hide=True, warn=True)
    if not result.ok:
        if re.search(r"Cannot find service|could not be found|NOT_FOUND|404", result.stderr):
            return None
        raise Exit(f"`{shlex.join(command)}` failed:\n{result.stderr}")
    return json.loads(result.stdout)


def traffic_tag(image_tag: str) -> str:
    # Tags are lower-case letters, digits and dashes, starting with a letter; they become part of a URL.
    return ("rev-" + re.sub(r"[^a-z0-9-]+", "-", image_tag.lower())).strip("-")[:46]


def tagged(service: dict, tag: str) -> dict:
    for target in service.get("status", {}).get("traffic", []):
        if target.get("tag") == tag:
            return target
    raise Exit(f"Cloud Run reports no traffic target tagged {tag!r} after the deploy: {service.get('status')}")


def move_traffic_command(c: Context, revision: str) -> list[str]:
    return ["gcloud", "run", "services", "update-traffic", c.cloudrun.service, *where(c),
            "--to-revisions", f"{revision}=100", "--quiet"]  # fmt: skip


def deploy(c: Context, tag: str, dry_run: bool, declarative: bool = False, model_mount: bool = False) -> None:
    """Build, deploy a candidate revision with no traffic and a tag, smoke-test its URL, then move traffic to it.

    `declarative` applies a rendered service.yaml with `gcloud run services replace` instead of flags;
    `model_mount` mounts the model's bucket read-only instead of downloading the model."""
    declarative = declarative or c.cloudrun.declarative
    model_mount = model_mount or c.cloudrun.model_mount
    check_ready(c, dry_run)
    if not dry_run:
        require_runtime_account(c)
    image_tag = tag or image.default_tag(c)
    image_ref = image.image_ref(c, "cloudrun", image_tag)
    if model_mount:
        mounted_model_path(c)  # a config it cannot serve fails before the build
    if c.cloudrun.build == "cloudbuild":
        c.run(shlex.join(cloudbuild_command(c, image_tag)), dry=dry_run)
    else:
        image.build_and_push(c, "cloudrun", image_tag, dry_run)
    if c.deploy.require_scan:  # docs/image.md, "Supply chain": no revision of an image that fails the scan
        scan.gate(c, image_ref, dry_run=dry_run)
    apply = apply_manifest if declarative else apply_flags

    existing = None if dry_run else describe(c)
    if dry_run:
        print("# first deploy creates the service with all traffic; later deploys run as shown:")
    if existing is None and not dry_run:
        apply(c, image_ref, None, None, model_mount, dry_run=False)
        result = smoke_test(c, describe(c)["status"]["url"])
        if not result.ok:
            raise Exit(f"smoke test failed: {result.reason}\nthe new service is up but does not serve the model")
        return

    candidate = traffic_tag(image_tag)
    apply(c, image_ref, candidate, existing, model_mount, dry_run)
    if dry_run:
        print(f"# then: smoke test the {candidate} tag URL, then:")
        c.run(shlex.join(move_traffic_command(c, f"{c.cloudrun.service}-REVISION")), dry=True)
        return
    target = tagged(describe(c), candidate)
    result = smoke_test(c, target["url"])
    if not result.ok:
        serving = ", ".join(serving_revisions(existing)) or "the previous revision"
        raise Exit(
            f"smoke test failed: {result.reason}\ntraffic stays on {serving}; "
            f"the failed revision {target['revisionName']} keeps tag {candidate} for inspection"
        )
    c.run(shlex.join(move_traffic_command(c, target["revisionName"])))
    print(f"traffic: 100% to {target['revisionName']} ({describe(c)['status']['url']})")


def apply_flags(c: Context, image_ref: str, candidate: str | None, existing: dict | None, model_mount: bool,
                dry_run: bool) -> None:
    c.run(shlex.join(deploy_command(c, image_ref, candidate, model_mount)), dry=dry_run)


def apply_manifest(c: Context, image_ref: str, candidate: str | None, existing: dict | None, model_mount: bool,
                   dry_run: bool) -> None:
    """Render service.yaml (the candidate: a named revision at 0% with its tag) and `gcloud run services replace` it."""
    revision = traffic = None
    if candidate:
        # unique per deploy: a revision name cannot be reused with another template
        revision = f"{c.cloudrun.service}-{candidate}"[:58].rstrip("-") + f"-{int(time.time()) % 0x10000:04x}"
        traffic = cloudrun_yaml.candidate_traffic(existing or {"spec": {"traffic": [
            {"percent": 100, "latestRevision": True}]}}, revision, candidate)
    service = cloudrun_yaml.manifest(c, image_ref, model_mount, revision, traffic)
    path = c.cloudrun.manifest
    replace = ["gcloud", "run", "services", "replace", path, *where(c), "--quiet"]
    if dry_run:
        print(f"# {path}, as rendered:\n{cloudrun_yaml.dump(service)}")
        c.run(shlex.join(replace), dry=True)
        return
    cloudrun_yaml.write(path, service)
    print(f"wrote {path}" + (f" (revision {revision} with no traffic, tag {candidate})" if candidate else ""))
    c.run(shlex.join(replace))
    if existing is None and c.cloudrun.public:  # a manifest carries no IAM: the flag path's --allow-unauthenticated
        c.run(shlex.join(["gcloud", "run", "services", "add-iam-policy-binding", c.cloudrun.service, *where(c),
                          "--member=allUsers", "--role=roles/run.invoker", "--quiet"]), hide="out")


def render(c: Context, tag: str, output: str, model_mount: bool) -> None:
    """Write service.yaml for the current config: all traffic to the revision it makes."""
    require_project(c)
    require_gcs_model(c, "Cloud Run")
    image_ref = image.image_ref(c, "cloudrun", tag or image.default_tag(c))
    path = cloudrun_yaml.write(output or c.cloudrun.manifest,
                               cloudrun_yaml.manifest(c, image_ref, model_mount or c.cloudrun.model_mount))
    print(f"wrote {path}: apply it with `gcloud run services replace {path} --region {c.gcp.region}` "
          "or `invoke deploy --target cloudrun --declarative`")


def smoke_test(c: Context, url: str) -> smoke.SmokeResult:
    """A private service's smoke test carries an identity token, beside the API key."""
    return smoke.after_deploy(c, url, smoke.access(c, "cloudrun"))


def serving_revisions(service: dict) -> list[str]:
    return [t["revisionName"] for t in service.get("status", {}).get("traffic", []) if t.get("percent")]


def rollback(c: Context, to: str, dry_run: bool) -> None:
    """Move all traffic back to `to`, or to the newest ready revision older than the one serving now."""
    check_ready(c, dry_run)
    if dry_run:
        c.run(shlex.join(move_traffic_command(c, to or f"{c.cloudrun.service}-PREVIOUS")), dry=True)
        return
    if not to:
        to = previous_revision(c)
    c.run(shlex.join(move_traffic_command(c, to)))
    print(f"traffic: 100% to {to}")


def previous_revision(c: Context) -> str:
    service = describe(c)
    if service is None:
        raise Exit(f"service {c.cloudrun.service} does not exist in {c.gcp.region}: nothing to roll back.")
    serving = serving_revisions(service)
    command = ["gcloud", "run", "revisions", "list", "--service", c.cloudrun.service, *where(c), "--format", "json"]
    revisions = json.loads(c.run(shlex.join(command), hide=True).stdout)

    def ready(revision: dict) -> bool:
        conditions = revision.get("status", {}).get("conditions", [])
        return any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in conditions)

    created = {r["metadata"]["name"]: r["metadata"].get("creationTimestamp", "") for r in revisions}
    newest_serving = max((created.get(name, "") for name in serving), default="")
    older = sorted(
        (r for r in revisions if ready(r) and created[r["metadata"]["name"]] < newest_serving),
        key=lambda r: created[r["metadata"]["name"]],
    )
    if not older:
        raise Exit(f"no ready revision older than {', '.join(serving)}: pass --to REVISION.")
    return older[-1]["metadata"]["name"]
