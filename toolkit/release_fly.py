"""A model release on Fly.io. Fly routes to the least loaded Machine, with no percentages, so there are no steps:
`flyctl deploy --image <the image that serves> --env MODEL_URI=... --strategy bluegreen` starts a green Machine
for every blue one and switches only when all pass fly.toml's checks (failed green Machines are destroyed, the blue
ones keep serving); then the smoke test with the samples; on failure the previous image and model come back."""

from __future__ import annotations

import json
import shlex

from invoke import Context, Exit

from toolkit import fly, release_core as common, release_journal as journal, smoke


def current_release(c: Context) -> dict:
    """The newest complete release (`flyctl releases --json`): its ImageRef is what serves."""
    result = c.run(shlex.join([fly.flyctl(), "releases", "--json", *fly.app_flags(c)]), hide=True, warn=True)
    if not result.ok:
        raise Exit(f"`flyctl releases` failed for {c.fly.app}: {result.stderr.strip()}")
    releases = [r for r in json.loads(result.stdout or "[]") if r.get("Status") == "complete" and r.get("ImageRef")]
    if not releases:
        raise Exit(f"{c.fly.app} has no complete release: `invoke deploy --target fly` first; a release puts a new "
                   "model on what serves")
    return max(releases, key=lambda r: r.get("Version", 0))


def machines(c: Context) -> list[dict]:
    result = c.run(shlex.join([fly.flyctl(), "status", "--json", *fly.app_flags(c)]), hide=True, warn=True)
    if not result.ok:
        raise Exit(f"`flyctl status` failed for {c.fly.app}: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}").get("Machines") or []


def serving_model(env: dict[str, str]) -> dict[str, str]:
    return {"uri": env.get("MODEL_URI", ""), "sha256": env.get("MODEL_SHA256", "")}


def with_model(env: dict[str, str], model: dict[str, str]) -> dict[str, str]:
    """The Machines' env with only the model changed."""
    changed = {**env, "MODEL_URI": model["uri"], "MODEL_SHA256": model.get("sha256", "")}
    return {name: value for name, value in changed.items() if value or name != "MODEL_SHA256"}


def machines_state(c: Context) -> str:
    rows = [f"{m['id']} {m.get('state')} {(m.get('config') or {}).get('image')} MODEL_URI="
            f"{((m.get('config') or {}).get('env') or {}).get('MODEL_URI')}" for m in machines(c)]
    return "; ".join(rows) or "no Machines"


def way_back(c: Context, stable: dict) -> journal.WayBack:
    """The image and env the Machines ran before the release, unless they run them still."""
    command = fly.rollback_command(c, stable)

    def go() -> str:
        envs = [(m.get("config") or {}).get("env") or {} for m in machines(c)]
        if not envs or any(env != stable["env"] for env in envs):
            print(f"going back: {shlex.join(command)}", flush=True)
            c.run(shlex.join(command))
        return f"release rolled back, {stable['env'].get('MODEL_URI')} serves again on {stable['image']}"

    return journal.WayBack(go, lambda: machines_state(c), shlex.join(command))


def release(c: Context, plan: common.Plan, samples_path: str) -> None:
    c.config.model.uri, c.config.model.sha256 = plan.model, plan.sha256
    fly.check_ready(c, plan.dry_run)
    candidate = {"uri": plan.model, "sha256": plan.sha256}
    if plan.dry_run:
        releases = shlex.join([fly.flyctl() or "flyctl", "releases", "--json", *fly.app_flags(c)])
        print(f"# {releases}  (the image that serves)")
        common.compare_gate(c, plan, "SERVING_MODEL_URI", "", samples_path)
        c.run(shlex.join(fly.redeploy_command(c, "SERVING_IMAGE", with_model({}, candidate), "bluegreen")), dry=True)
        print(f"# (and --env NAME=VALUE for every other variable the Machines have now)\n# then: smoke test "
              f"{fly.app_url(c)} with the samples; on failure or Ctrl-C: "
              + shlex.join(fly.rollback_command(c, {"image": "SERVING_IMAGE", "env": {"MODEL_URI": "SERVING_MODEL"}})))
        return
    fly.require_bucket_access(c, fly.secret_names(c))
    image_ref = current_release(c)["ImageRef"]
    now = fly.serving(c)
    env = now["env"] if now else {}
    if not env.get("MODEL_URI"):  # Machines that do not say: the last release's model, else model.uri
        released = journal.last_release(c, "fly")
        env = with_model(env, released["model"] if released else {"uri": str(c.model.uri), "sha256": ""})
    previous = serving_model(env)
    if previous["uri"] == plan.model and previous.get("sha256", "") == plan.sha256:
        raise Exit(f"{c.fly.app} already serves {plan.model}: nothing to release")
    print(f"serving: {image_ref} with {previous['uri']}")
    common.compare_gate(c, plan, previous["uri"], previous.get("sha256", ""), samples_path)
    reach = smoke.access(c, "fly")

    stable = {"image": image_ref, "env": env}
    forward = with_model({**fly.credentials_env(c), **env}, candidate)  # the Machines' settings win over config's
    entry = journal.begin(c, "fly", candidate, previous, stable)
    with journal.guarded(c, entry, way_back(c, stable)):
        journal.note(c, entry, "deploying", f"blue-green: {image_ref} with {plan.model}")
        deployed = c.run(shlex.join(fly.redeploy_command(c, image_ref, forward, "bluegreen")),
                         warn=True)
        if not deployed.ok:
            detail = ((deployed.stderr or "").strip().splitlines() or ["no detail"])[-1]
            raise Exit(f"the blue-green deploy failed, the previous Machines keep serving {previous['uri']} ({detail})")
        journal.note(c, entry, "deployed", f"every Machine runs {plan.model}")
        result = smoke.after_deploy(c, fly.app_url(c), reach, sample=plan.samples[0] if plan.samples else None)
        if not result.ok:
            raise Exit(f"smoke test failed: {result.reason}")
        if plan.samples:
            try:
                common.answers(fly.app_url(c), plan.samples, reach)
            except Exit as exc:
                raise Exit(f"answers on the samples: {exc.message}") from None
        journal.promote(c, entry, image=image_ref)
    print(f"released: {plan.model} serves on every Machine of {c.fly.app}")


def still_serving(c: Context, entry: dict) -> bool:
    """The release's image and model are what the current release runs (no deploy replaced them)."""
    now = fly.serving(c)
    return current_release(c)["ImageRef"] == entry["image"] and bool(now) and serving_model(now["env"])["uri"] == (
        entry["model"]["uri"])


def rollback_command(c: Context, entry: dict) -> tuple[list[str], str]:
    """Undo a release (promoted, held or interrupted): the image and env it started from."""
    stable = entry.get("stable") or {"image": entry["image"], "env": with_model({}, entry["previous"])}
    return fly.rollback_command(c, stable), f"redeployed {stable['image']} with {entry['previous']['uri']}"


def finish_hint(entry: dict) -> str:
    return f"{entry['stable']['image']} with {entry['previous']['uri']} again"


def status(c: Context, as_json: bool) -> None:
    if not c.fly.app:
        raise Exit("fly.app is not set: put `fly: {app: MY-APP}` in invoke.yaml or set INVOKE_FLY_APP.")
    if not fly.flyctl():
        raise Exit("flyctl is not on PATH: install it (https://fly.io/docs/flyctl/install/).")
    found = machines(c)
    reach = smoke.access(c, "fly")
    rows = []
    for machine in found:
        ref = machine.get("image_ref") or {}
        image = f"{ref.get('registry', '')}/{ref.get('repository', '')}@{ref.get('digest', '')}"
        # Fly routes to the least loaded Machine: a Machine's share is its part of the started ones.
        started = [m for m in found if m.get("state") == "started"]
        share = f"1/{len(started)}" if machine.get("state") == "started" else "0"
        health = common.health_of(fly.app_url(c), reach, headers={"fly-force-instance-id": machine["id"]})
        rows.append({"machine": machine["id"], "region": machine.get("region"), "state": machine.get("state"),
                     "share": share, "image": image, "health": health})
    common.show(rows, as_json, "machine")
