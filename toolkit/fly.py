"""Fly.io: deploy with flyctl (Fly's remote builder, or an image pushed from here), smoke-test the app's URL, and
redeploy the previous release's image when the smoke test fails. Every flyctl command is built here, from config.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import shutil
import sys
from pathlib import Path

from invoke import Context, Exit, task

from service import auth
from toolkit import image, smoke
from toolkit.gcp import runtime_account
from toolkit.model import model_env, require_gcs_model

KEY_SECRET = "GCP_SA_JSON_B64"  # the fallback: a service-account key, stored by `invoke fly.credentials`
KEY_PATH = "/secrets/gcp.json"


def flyctl() -> str:
    return shutil.which("flyctl") or shutil.which("fly") or ""


def check_ready(c: Context, dry_run: bool) -> None:
    if not c.fly.app:
        raise Exit("fly.app is not set: put `fly: {app: MY-APP}` in invoke.yaml or set INVOKE_FLY_APP.")
    require_gcs_model(c, "the Fly app")
    if not Path(c.fly.config).is_file():
        raise Exit(f"{c.fly.config} not found: run from the project root, or set fly.config.")
    if c.fly.workload_identity_provider and not c.gcp.project:
        raise Exit("fly.workload_identity_provider is set but gcp.project is not: set both as `invoke gcp.setup "
                   "--fly` printed them.")
    if dry_run:
        return
    if not flyctl():
        raise Exit("flyctl is not on PATH: install it (https://fly.io/docs/flyctl/install/).")
    if not c.run(f"{flyctl()} auth whoami", hide=True, warn=True).ok:
        raise Exit("flyctl is not logged in: run `flyctl auth login` (or set FLY_API_TOKEN).")


def secret_names(c: Context) -> set[str]:
    result = c.run(shlex.join([flyctl(), "secrets", "list", "--json", *app_flags(c)]), hide=True, warn=True)
    return {s.get("name") or s.get("Name") for s in json.loads(result.stdout or "[]")} if result.ok else set()


def require_bucket_access(c: Context, names: set[str]) -> None:
    """Keyless access configured, or else the key secret stored: without either the app cannot read the model."""
    if c.fly.workload_identity_provider:
        return
    if KEY_SECRET not in names:
        raise Exit(f"the Fly app has no way to read {c.model.uri}: run `invoke gcp.setup --fly` and set "
                   "fly.workload_identity_provider as it prints (keyless, recommended), or store a service-account "
                   "key with `invoke fly.credentials --key-file key.json`.")


def credentials_env(c: Context) -> dict[str, str]:
    """How the app reaches the bucket: keyless (workload identity federation, service/credentials.py) when
    configured, else the key secret written to a file that Application Default Credentials reads."""
    if c.fly.workload_identity_provider:
        return {"GCP_WORKLOAD_IDENTITY_PROVIDER": c.fly.workload_identity_provider,
                "GCP_SERVICE_ACCOUNT": runtime_account(c), "GOOGLE_CLOUD_PROJECT": c.gcp.project}
    return {"GOOGLE_APPLICATION_CREDENTIALS": KEY_PATH}


def credentials_flags(c: Context) -> list[str]:
    env = credentials_env(c)
    flags = [] if c.fly.workload_identity_provider else ["--file-secret", f"{KEY_PATH}={KEY_SECRET}"]
    return flags + [flag for name, value in env.items() for flag in ("--env", f"{name}={value}")]


def app_flags(c: Context) -> list[str]:
    return ["--app", c.fly.app]


def deploy_command(c: Context, image_ref: str | None, label: str) -> list[str]:
    """`flyctl deploy`: Fly's remote builder by default, or a given image (pushed from here, or a rollback)."""
    command = [flyctl() or "flyctl", "deploy", *app_flags(c), "--config", c.fly.config, "--wait-timeout", "10m"]
    command += ["--image", image_ref] if image_ref else ["--remote-only", "--image-label", label]
    for name, value in model_env(c).items():
        command += ["--env", f"{name}={value}"]
    command += credentials_flags(c)
    if not image_ref:  # Fly's builder gets the BUILD_* arguments image.build passes, for /health's "build"
        command += [flag for name, value in image.build_args(c, label).items() for flag in ("--build-arg", f"{name}={value}")]
    return command


def app_url(c: Context) -> str:
    return c.fly.url or f"https://{c.fly.app}.fly.dev"


def serving(c: Context) -> dict | None:
    """What the app's Machines run now (`flyctl status --json`): {"image": REF, "env": {...}}, the state a deploy or a
    release comes back to; None for a new app (no Machines yet)."""
    result = c.run(shlex.join([flyctl(), "status", "--json", *app_flags(c)]), hide=True, warn=True)
    if not result.ok:
        return None
    for machine in json.loads(result.stdout or "{}").get("Machines") or []:
        ref = machine.get("image_ref") or {}
        if ref.get("repository"):
            name = f"{ref.get('registry', 'registry.fly.io')}/{ref['repository']}"
            image_ref = f"{name}@{ref['digest']}" if ref.get("digest") else f"{name}:{ref.get('tag', 'latest')}"
            return {"image": image_ref, "env": dict((machine.get("config") or {}).get("env") or {})}
    return None


def deploy(c: Context, tag: str, dry_run: bool) -> None:
    check_ready(c, dry_run)
    label = tag or image.default_tag(c)
    if not dry_run:
        names = secret_names(c)
        require_bucket_access(c, names)
        if "API_KEYS" not in names:
            print(f"note: {c.fly.app} has no API_KEYS secret, so anyone who finds {app_url(c)} can run the model on "
                  "your bill; `invoke fly.api-key` makes a key and stores it")
    previous = None if dry_run else serving(c)
    image_ref = None
    if c.fly.build == "image":
        image_ref = image.image_ref(c, "fly", label)
        image.build_and_push(c, "fly", label, dry_run)
    c.run(shlex.join(deploy_command(c, image_ref, label)), dry=dry_run)
    if dry_run:
        print(f"# then: smoke test {app_url(c)}; on failure: flyctl deploy --image <previous image> --strategy immediate")
        return
    result = smoke.after_deploy(c, app_url(c))
    if result.ok:
        return
    if previous:
        print(f"smoke test failed ({result.reason}); redeploying the previous image {previous['image']} with its env")
        c.run(shlex.join(rollback_command(c, previous)))
        raise Exit(f"smoke test failed: {result.reason}\nrolled back to {previous['image']}")
    raise Exit(f"smoke test failed: {result.reason}\nno previous release to roll back to")


def redeploy_command(c: Context, image_ref: str, env: dict[str, str], strategy: str) -> list[str]:
    """`flyctl deploy` of an image that exists with exactly `env`: a deploy rebuilds each Machine's env from fly.toml's
    [env] and the --env flags, so whatever is not passed is dropped. Secrets are the app's and stay; the key file
    secret is mounted again when the env points at it."""
    command = [flyctl() or "flyctl", "deploy", *app_flags(c), "--config", c.fly.config, "--image", image_ref,
               "--strategy", strategy, "--wait-timeout", "10m"]
    for name, value in sorted(env.items()):
        command += ["--env", f"{name}={value}"]
    if env.get("GOOGLE_APPLICATION_CREDENTIALS") == KEY_PATH:
        command += ["--file-secret", f"{KEY_PATH}={KEY_SECRET}"]
    return command


def rollback_command(c: Context, back: dict) -> list[str]:
    """Fly has no rollback command: redeploy the older image with the env its Machines had (MODEL_URI,
    MODEL_SHA256, settings), at once."""
    return redeploy_command(c, back["image"], back["env"], "immediate")


def previous_release_image(c: Context) -> str:
    result = c.run(shlex.join([flyctl(), "releases", "--json", "--image", *app_flags(c)]), hide=True)
    releases = json.loads(result.stdout or "[]")
    images = [r.get("ImageRef") for r in sorted(releases, key=lambda r: r.get("Version", 0), reverse=True)]
    current = images[0] if images else None
    for ref in images[1:]:
        if ref and ref != current:
            return ref
    raise Exit("no earlier release with a different image: pass --to IMAGE.")


def rollback(c: Context, to: str, dry_run: bool) -> None:
    check_ready(c, dry_run)
    if dry_run:
        c.run(shlex.join(rollback_command(c, {"image": to or "<previous release image>", "env": {}})), dry=True)
        print("# with --env NAME=VALUE for each variable the Machines have now (MODEL_URI, MODEL_SHA256, settings)")
        return
    now = serving(c)
    target = to or previous_release_image(c)
    c.run(shlex.join(rollback_command(c, {"image": target, "env": now["env"] if now else {}})))
    print(f"redeployed {target} with the env the Machines had (model {(now or {}).get('env', {}).get('MODEL_URI')})")


@task(
    help={
        "key_file": "Google service-account key (JSON) with roles/storage.objectViewer on the model bucket",
        "dry_run": "print the command instead of running it",
    }
)
def credentials(c, key_file, dry_run=False):
    """Store a service-account key as the Fly secret the app reads (fallback to keyless `gcp.setup --fly`)."""
    dry_run = dry_run or c.config.run.dry
    check_ready(c, dry_run)
    try:
        key = json.loads(Path(key_file).read_text())
    except (OSError, ValueError) as exc:
        raise Exit(f"cannot read {key_file} as a service-account key: {exc}") from None
    if key.get("type") != "service_account":
        raise Exit(f"{key_file} is not a service-account key (type {key.get('type')!r}); create one with "
                   "`gcloud iam service-accounts keys create key.json --iam-account=SA_EMAIL`.")
    # Piped on stdin (NAME=-), never on the command line; deploy's --file-secret writes it to the credentials path.
    encoded = base64.b64encode(Path(key_file).read_bytes()).decode()
    command = [flyctl() or "flyctl", "secrets", "set", f"{KEY_SECRET}=-", "--stage", *app_flags(c)]
    if dry_run:
        print(shlex.join(command) + " < base64 " + key_file)
        return
    c.run(shlex.join(command), in_stream=_Stdin(encoded), hide="out")
    print(f"stored secret {KEY_SECRET}; it takes effect on the next `invoke deploy --target fly` (unless "
          "fly.workload_identity_provider is set: keyless access wins)")


@task(
    help={
        "keep": "keys to keep beside the new one, comma-separated (the one clients use now, while they move over); "
        "`-` reads them from standard input, out of sight of `ps` and the shell's history",
        "new": "make a new key (--no-new: store only the --keep keys, to retire the others after a rotation)",
        "stage": "store it for the next deploy instead of restarting the app's machines with it now",
        "dry_run": "print the command instead of running it (no key is made)",
    }
)
def api_key(c, keep="", new=True, stage=False, dry_run=False):
    """Make a strong API key, store the app's API_KEYS secret with it, and print it once."""
    dry_run = dry_run or c.config.run.dry
    if not c.fly.app:
        raise Exit("fly.app is not set: put `fly: {app: MY-APP}` in invoke.yaml or set INVOKE_FLY_APP.")
    try:
        kept = auth.parse(sys.stdin.read() if keep == "-" else keep)
    except ValueError as exc:
        raise Exit(f"--keep: {exc}") from None
    if not new and not kept:
        raise Exit("--no-new stores only the --keep keys, and none were given: pass --keep KEY (the key clients "
                   "use now), or leave out --no-new to make one.")
    # Piped on stdin (NAME=-), never on the command line, where `ps` on this machine would show it.
    command = [flyctl() or "flyctl", "secrets", "set", "API_KEYS=-", *app_flags(c), *(["--stage"] if stage else [])]
    if dry_run:
        given = [*(["a new key"] if new else []), *([f"{len(kept)} kept key(s)"] if kept else [])]
        print(shlex.join(command) + " < " + " and ".join(given))
        return
    if not flyctl():
        raise Exit("flyctl is not on PATH: install it (https://fly.io/docs/flyctl/install/).")
    if not c.run(f"{flyctl()} auth whoami", hide=True, warn=True).ok:
        raise Exit("flyctl is not logged in: run `flyctl auth login` (or set FLY_API_TOKEN).")
    key = secrets.token_urlsafe(32) if new else ""  # 256 random bits, 43 characters
    c.run(shlex.join(command), in_stream=_Stdin(",".join([key, *kept] if key else kept)), hide="out")
    when = "on the next deploy" if stage else "now: the app's machines restart with it, one by one"
    print(f"stored API_KEYS on {c.fly.app} ({'1 new key' if key else 'no new key'}, {len(kept)} kept); it takes "
          f"effect {when}")
    if key:
        print("the new key, shown this once (Fly keeps secrets write-only):")
        print(key)
        print(f"send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`; for the deploys' smoke tests, "
              f"export {smoke.API_KEY_VARIABLE}=KEY")


class _Stdin:
    """A one-shot readable stream for c.run(in_stream=...)."""

    def __init__(self, text: str):
        self.data = text

    def read(self, size: int = -1) -> str:
        chunk, self.data = (self.data, "") if size < 0 else (self.data[:size], self.data[size:])
        return chunk
