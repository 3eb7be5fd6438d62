"""A model release on Fly.io. Fly routes to the least loaded Machine, with no percentages, so there are no steps:
`flyctl deploy --image <the image that serves> --env MODEL_URI=... --strategy bluegreen` starts a green Machine
for every blue one and switches only when all pass fly.toml's checks (failed green Machines are destroyed, the blue
ones keep serving); then the smoke test with the samples; on failure the previous image and model come back."""

from __future__ import annotations

import json
import shlex

from invoke import Context, Exit

from toolkit import fly, release as common, smoke


def current_release(c: Context) -> dict:
    """The newest complete release (`flyctl releases --json`): its ImageRef is what serves."""
    result = c.run(shlex.join([fly.flyctl(), "releases", "--json", *fly._app(c)]), hide=True, warn=True)
    if not result.ok:
        raise Exit(f"`flyctl releases` failed for {c.fly.app}: {result.stderr.strip()}")
    releases = [r for r in json.loads(result.stdout or "[]") if r.get("Status") == "complete" and r.get("ImageRef")]
    if not releases:
        raise Exit(f"{c.fly.app} has no complete release: `invoke deploy --target fly` first; a release puts a new "
                   "model on what serves")
    return max(releases, key=lambda r: r.get("Version", 0))


def machines(c: Context) -> list[dict]:
    result = c.run(shlex.join([fly.flyctl(), "status", "--json", *fly._app(c)]), hide=True, warn=True)
    if not result.ok:
        raise Exit(f"`flyctl status` failed for {c.fly.app}: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}").get("Machines") or []


def serving_model(c: Context) -> dict[str, str]:
    """MODEL_URI/MODEL_SHA256 of the Machines (their config's env), else the last release's, else model.uri."""
    for machine in machines(c):
        env = (machine.get("config") or {}).get("env") or {}
        if env.get("MODEL_URI"):
            return {"uri": env["MODEL_URI"], "sha256": env.get("MODEL_SHA256", "")}
    released = common.last_release(c, "fly")
    if released:
        return dict(released["model"])
    return {"uri": str(c.model.uri), "sha256": str(c.model.sha256)}


def deploy_command(c: Context, image_ref: str, model: dict[str, str], strategy: str) -> list[str]:
    """The same flags as a code deploy (`fly.deploy_command`, with config.model set to `model`) plus a strategy."""
    c.config.model.uri, c.config.model.sha256 = model["uri"], model.get("sha256", "")
    return [*fly.deploy_command(c, image_ref, ""), "--strategy", strategy]


def release(c: Context, plan: common.Plan, samples_path: str) -> None:
    c.config.model.uri, c.config.model.sha256 = plan.model, plan.sha256
    fly.check_ready(c, plan.dry_run)
    candidate = {"uri": plan.model, "sha256": plan.sha256}
    if plan.dry_run:
        releases = shlex.join([fly.flyctl() or "flyctl", "releases", "--json", *fly._app(c)])
        print(f"# {releases}  (the image that serves)")
        common.compare_gate(c, plan, "SERVING_MODEL_URI", "", samples_path)
        c.run(shlex.join(deploy_command(c, "SERVING_IMAGE", candidate, "bluegreen")), dry=True)
        print(f"# then: smoke test {fly.app_url(c)} with the samples; on failure: "
              + shlex.join(deploy_command(c, "SERVING_IMAGE", {"uri": "SERVING_MODEL_URI"}, "immediate")))
        return
    fly.require_bucket_access(c, fly.secret_names(c))
    image_ref = current_release(c)["ImageRef"]
    previous = serving_model(c)
    if previous["uri"] == plan.model and previous.get("sha256", "") == plan.sha256:
        raise Exit(f"{c.fly.app} already serves {plan.model}: nothing to release")
    print(f"serving: {image_ref} with {previous['uri']}")
    common.compare_gate(c, plan, previous["uri"], previous.get("sha256", ""), samples_path)

    deployed = c.run(shlex.join(deploy_command(c, image_ref, candidate, "bluegreen")), warn=True)
    if not deployed.ok:
        detail = ((deployed.stderr or "").strip().splitlines() or ["no detail"])[-1]
        raise Exit(f"release stopped: the blue-green deploy failed, the previous Machines keep serving "
                   f"{previous['uri']} ({detail})")
    result = smoke.check(fly.app_url(c), timeout=float(c.smoke.timeout),
                         sample=plan.samples[0] if plan.samples else None, expect_sha256=plan.sha256)
    failure = result.reason if not result.ok else ""
    if not failure and plan.samples:
        try:
            common.answers(fly.app_url(c), plan.samples)
        except Exit as exc:
            failure = exc.message
    if failure:
        c.run(shlex.join(deploy_command(c, image_ref, previous, "immediate")))
        raise Exit(f"release rolled back, {previous['uri']} serves again on {image_ref}: smoke test failed: {failure}")
    common.record(c, {"target": "fly", "model": candidate, "previous": previous, "image": image_ref})
    print(f"released: {plan.model} serves on every Machine of {c.fly.app}")


def still_serving(c: Context, entry: dict) -> bool:
    """The release's image and model are what the current release runs (no deploy replaced them)."""
    return current_release(c)["ImageRef"] == entry["image"] and serving_model(c)["uri"] == entry["model"]["uri"]


def rollback_command(c: Context, entry: dict) -> tuple[list[str], str]:
    """Undo a release: the image it ran on, with the model it replaced."""
    command = deploy_command(c, entry["image"], entry["previous"], "immediate")
    return command, f"redeployed {entry['image']} with {entry['previous']['uri']}"


def status(c: Context, as_json: bool) -> None:
    if not c.fly.app:
        raise Exit("fly.app is not set: put `fly: {app: MY-APP}` in invoke.yaml or set INVOKE_FLY_APP.")
    if not fly.flyctl():
        raise Exit("flyctl is not on PATH: install it (https://fly.io/docs/flyctl/install/).")
    found = machines(c)
    rows = []
    for machine in found:
        ref = machine.get("image_ref") or {}
        image = f"{ref.get('registry', '')}/{ref.get('repository', '')}@{ref.get('digest', '')}"
        # Fly routes to the least loaded Machine: a Machine's share is its part of the started ones.
        started = [m for m in found if m.get("state") == "started"]
        share = f"1/{len(started)}" if machine.get("state") == "started" else "0"
        health = common.health_of(fly.app_url(c), headers={"fly-force-instance-id": machine["id"]})
        rows.append({"machine": machine["id"], "region": machine.get("region"), "state": machine.get("state"),
                     "share": share, "image": image, "health": health})
    common.show(rows, as_json, "machine")
