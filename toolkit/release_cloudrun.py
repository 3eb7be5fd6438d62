"""A model release on Cloud Run: a revision of the serving image digest with only MODEL_URI/MODEL_SHA256 changed,
no traffic and its own tag; smoke test and answers check on the tag URL; then traffic in steps
(`update-traffic --to-revisions CAND=P`), each judged on Cloud Monitoring against the stable revision, with an
immediate return to 100% stable on a failed gate."""

from __future__ import annotations

import json
import shlex
import time

from invoke import Context, Exit

from toolkit import cloudrun, monitoring, release_core as common, release_journal as journal, smoke
from toolkit.cloudrun import describe, where

TAG_LIMIT = 46  # Cloud Run: "Combined traffic tag and service name cannot exceed 46 characters."


def model_tag(c: Context, plan: common.Plan) -> str:
    tag = f"m-{plan.pinned_id}"
    if len(tag) + len(c.cloudrun.service) > TAG_LIMIT:
        raise Exit(f"tag {tag!r} and service {c.cloudrun.service!r} together are {len(tag) + len(c.cloudrun.service)} "
                   f"characters; Cloud Run allows {TAG_LIMIT}: use a shorter cloudrun.service or pin the model by "
                   "--sha256 (12 characters) instead of its generation")
    return tag


def revision(c: Context, name: str) -> dict:
    command = ["gcloud", "run", "revisions", "describe", name, *where(c), "--format", "json"]
    result = c.run(shlex.join(command), hide=True, warn=True)
    if not result.ok:
        raise Exit(f"`{shlex.join(command)}` failed:\n{result.stderr}")
    return json.loads(result.stdout)


def revision_env(rev: dict) -> dict[str, str]:
    container = rev["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def image_by_digest(rev: dict) -> str:
    """The revision's image as REPO@sha256:..., from status.imageDigest (full reference or a bare digest)."""
    digest = rev.get("status", {}).get("imageDigest", "")
    if not digest:
        raise Exit(f"revision {rev['metadata']['name']} reports no status.imageDigest: is it ready? "
                   "`gcloud run revisions describe` shows it")
    if "@" in digest:
        return digest
    image = rev["spec"]["containers"][0]["image"].split("@")[0]
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return f"{repository}@{digest}"


def stable_revision(service: dict, candidate_tag: str) -> str:
    """The one revision that serves besides the candidate; a release needs exactly one."""
    candidate = next((t["revisionName"] for t in service["status"].get("traffic", []) if t.get("tag") == candidate_tag),
                     None)
    shares: dict[str, int] = {}
    for target in service["status"].get("traffic", []):
        if target.get("percent") and target["revisionName"] != candidate:
            shares[target["revisionName"]] = shares.get(target["revisionName"], 0) + target["percent"]
    if len(shares) != 1:
        split = ", ".join(f"{name} {share}%" for name, share in shares.items()) or "nothing"
        raise Exit(f"traffic goes to {split}: a release needs one serving revision to compare with; "
                   "`invoke rollback --target cloudrun --to REVISION` sends all traffic to one first")
    return next(iter(shares))


def update_command(c: Context, image_ref: str, plan: common.Plan, tag: str) -> list[str]:
    env = {"MODEL_URI": plan.model, "MODEL_SHA256": plan.sha256}
    command = ["gcloud", "run", "services", "update", c.cloudrun.service, *where(c), "--image", image_ref,
               "--update-env-vars", "^@^" + "@".join(f"{k}={v}" for k, v in env.items()),
               "--no-traffic", "--tag", tag, "--quiet"]
    return command


def traffic_command(c: Context, revision_name: str, percent: int) -> list[str]:
    return ["gcloud", "run", "services", "update-traffic", c.cloudrun.service, *where(c),
            "--to-revisions", f"{revision_name}={percent}", "--quiet"]


def split_of(service: dict | None) -> dict[str, int]:
    """Revision -> percent of the traffic it takes."""
    shares: dict[str, int] = {}
    for target in (service or {}).get("status", {}).get("traffic", []):
        if target.get("percent"):
            shares[target["revisionName"]] = shares.get(target["revisionName"], 0) + target["percent"]
    return shares


def describe_split(shares: dict[str, int]) -> str:
    return ", ".join(f"{name} {percent}%" for name, percent in shares.items()) or "no traffic at all"


def way_back(c: Context, stable: str) -> journal.WayBack:
    """All traffic to the stable revision, unless it has it already; checked by reading the service again."""
    command = traffic_command(c, stable, 100)

    def go() -> str:
        try:
            shares = split_of(describe(c))
        except Exit:
            shares = {}
        if shares != {stable: 100}:
            print(f"going back: {shlex.join(command)}", flush=True)
            c.run(shlex.join(command))
            shares = split_of(describe(c))
            if shares != {stable: 100}:
                raise Exit(f"after update-traffic the service sends {describe_split(shares)}")
        return f"release stopped, traffic 100% on {stable}"

    return journal.WayBack(go, lambda: f"service {c.cloudrun.service} sends {describe_split(split_of(describe(c)))}",
                           shlex.join(command))


def release(c: Context, plan: common.Plan, samples_path: str) -> None:
    c.config.model.uri, c.config.model.sha256 = plan.model, plan.sha256  # what check_ready and the smoke test see
    cloudrun.check_ready(c, plan.dry_run)
    tag = model_tag(c, plan)
    if float(c.release.window) < 300 or plan.step_wait < 300:
        print(f"note: steps of {plan.step_wait:g}s judged on {float(c.release.window):g}s of figures; Cloud Monitoring "
              "samples every 60 s, so anything under 300 s is noise")
    if plan.dry_run:
        return dry_run(c, plan, tag, samples_path)

    service = describe(c)
    if service is None:
        raise Exit(f"service {c.cloudrun.service} does not exist in {c.gcp.region}: `invoke deploy --target cloudrun` "
                   "first; a release puts a new model on what serves")
    stable = stable_revision(service, tag)
    stable_rev = revision(c, stable)
    serving_env = revision_env(stable_rev)
    if serving_env.get("MODEL_URI") == plan.model and serving_env.get("MODEL_SHA256", "") == plan.sha256:
        raise Exit(f"{stable} already serves {plan.model}: nothing to release")
    image_ref = image_by_digest(stable_rev)
    print(f"serving: {stable} ({image_ref}) with {serving_env.get('MODEL_URI')}")
    common.compare_gate(c, plan, serving_env.get("MODEL_URI", ""), serving_env.get("MODEL_SHA256", ""), samples_path,
                        serving_env.get("WARMUP_INPUT", ""))
    reach = smoke.access(c, "cloudrun")

    previous = {"uri": serving_env.get("MODEL_URI", ""), "sha256": serving_env.get("MODEL_SHA256", "")}
    entry = journal.begin(c, "cloudrun", {"uri": plan.model, "sha256": plan.sha256}, previous,
                          {"revision": stable, "image": image_ref, "tag": tag})
    with journal.guarded(c, entry, way_back(c, stable)):
        existing = next((t for t in service["status"].get("traffic", []) if t.get("tag") == tag), None)
        if existing:  # a held or stopped release of a model with this tag: its revision may already take traffic
            journal.note(c, entry, "resuming", f"revision {existing['revisionName']} carries tag {tag}")
        if existing and revision_env(revision(c, existing["revisionName"])).get("MODEL_URI") == plan.model:
            print(f"resuming: revision {existing['revisionName']} already carries tag {tag}")
        else:
            journal.note(c, entry, "deploying", f"a revision of {image_ref} with {plan.model}, no traffic, tag {tag}")
            c.run(shlex.join(update_command(c, image_ref, plan, tag)))
            service = describe(c)
        candidate = cloudrun.tagged(service, tag)
        name = candidate["revisionName"]
        current = split_of(service).get(name, 0)
        journal.note(c, entry, "deployed", f"candidate {name} at {candidate['url']}, {current}% of the traffic",
                     candidate=name)

        result = smoke.after_deploy(c, candidate["url"], reach, sample=plan.samples[0] if plan.samples else None)
        if not result.ok:
            raise Exit(f"smoke test of {candidate['url']} failed: {result.reason}")
        try:
            # with traffic on it, the service URL no longer reaches only the stable one
            if plan.skip_compare or current:
                common.answers(candidate["url"], plan.samples, reach)
            else:
                common.compare_answers(c, service["status"]["url"], candidate["url"], plan.samples, reach)
        except Exit as exc:
            raise Exit(f"answers on the samples: {exc.message}") from None

        steps = [p for p in plan.steps if p > current]
        token = ""
        for number, percent in enumerate(steps, 1):
            journal.note(c, entry, "step", f"step {number} of {len(steps)}: {percent}% to {name}, {100 - percent}% to "
                                           f"{stable}", step=number, percent=percent)
            c.run(shlex.join(traffic_command(c, name, percent)))
            print(f"traffic: {percent}% to {name}, {100 - percent}% to {stable}")
            if percent == 100:
                break
            started = time.time()
            wait = plan.step_wait + float(c.release.ingestion_delay)
            print(f"waiting {wait:g}s: {plan.step_wait:g}s of traffic, then Cloud Monitoring's ingestion delay",
                  flush=True)
            time.sleep(wait)
            end = started + plan.step_wait
            start = max(started, end - float(c.release.window))
            token = token or monitoring.access_token(c)
            figures = [monitoring.read(c, r, start, end, token) for r in (name, stable)]
            verdict = common.judge(c, *figures)
            if verdict.action == "rollback":
                raise Exit(verdict.reason)
            if verdict.action == "hold":
                raise journal.Held(f"release held at {percent}% to {name}: {verdict.reason}; run the same "
                                   "`invoke release` again to judge a new window, or `invoke rollback --target "
                                   f"cloudrun` to go back to {stable}")
            print(f"step {percent}% healthy: {verdict.reason}")
        journal.promote(c, entry, revision=name, previous_revision=stable, image=image_ref, tag=tag)
    print(f"released: {plan.model} serves 100% on {name}")


def dry_run(c: Context, plan: common.Plan, tag: str, samples_path: str) -> None:
    print("# read what serves: its revision, image digest and model")
    for command in (["gcloud", "run", "services", "describe", c.cloudrun.service, *where(c), "--format", "json"],
                    ["gcloud", "run", "revisions", "describe", "SERVING_REVISION", *where(c), "--format", "json"]):
        c.run(shlex.join(command), dry=True)
    common.compare_gate(c, plan, "SERVING_MODEL_URI", "", samples_path)
    c.run(shlex.join(update_command(c, "REPOSITORY@sha256:SERVING_DIGEST", plan, tag)), dry=True)
    print(f"# smoke test and answers check on the {tag} tag URL, then for each step:")
    for percent in plan.steps:
        c.run(shlex.join(traffic_command(c, "CANDIDATE_REVISION", percent)), dry=True)
        if percent < 100:
            print(f"# wait {plan.step_wait:g}s + {c.release.ingestion_delay}s, then read for CANDIDATE_REVISION and "
                  "SERVING_REVISION:")
            for line in monitoring.describe_queries(c, "CANDIDATE_REVISION"):
                print(f"# {line}")
    print(f"# on a failed gate: {shlex.join(traffic_command(c, 'SERVING_REVISION', 100))}")


def still_serving(c: Context, entry: dict) -> bool:
    """The released revision still takes traffic (no code deploy or other release replaced it)."""
    service = describe(c)
    return service is not None and entry["revision"] in cloudrun.serving_revisions(service)


def rollback_command(c: Context, entry: dict) -> tuple[list[str], str]:
    """Undo a release (promoted, held or interrupted): all traffic to the revision it started from."""
    stable = (entry.get("stable") or {}).get("revision") or entry["previous_revision"]
    return traffic_command(c, stable, 100), f"traffic: 100% to {stable} ({entry['previous']['uri']})"


def finish_hint(entry: dict) -> str:
    return f"100% back to {(entry.get('stable') or {}).get('revision')}"


# ---- status --------------------------------------------------------------------------------------------------------


def status(c: Context, as_json: bool) -> None:
    cloudrun.check_gcloud(c)
    service = describe(c)
    if service is None:
        raise Exit(f"service {c.cloudrun.service} does not exist in {c.gcp.region}: nothing serves")
    rows: dict[str, dict] = {}
    for target in service["status"].get("traffic", []):
        row = rows.setdefault(target["revisionName"], {"revision": target["revisionName"], "percent": 0, "tags": []})
        row["percent"] += target.get("percent", 0)
        if target.get("tag"):
            row["tags"].append(target["tag"])
            row["url"] = target.get("url")
    reach = smoke.access(c, "cloudrun")
    for row in rows.values():
        rev = revision(c, row["revision"])
        row["image"] = image_by_digest(rev)
        row["env_model"] = revision_env(rev).get("MODEL_URI", "")
        url = row.get("url") or (service["status"]["url"] if len(rows) == 1 else "")
        row["health"] = common.health_of(url, reach) if url else {"error": "no URL of its own: tag it to reach it"}
    common.show(list(rows.values()), as_json, "revision")
