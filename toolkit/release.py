"""`invoke release`: a new model on the image that serves now, no build. Compare it with the serving model, start it
beside the serving one, smoke-test it, then move traffic to it (Cloud Run: in steps, judged on Cloud Monitoring;
Fly: one blue-green deploy). Every state is written to the release journal before its action, and any failure or
signal goes back to where the release started (`release_journal`). `status` shows what serves and a release that
did not end; `rollback` (in `deploy`) after a release goes back to where the journal says it started.

This module is the tasks and the table of platforms; what every release needs is `release_core`, the journal and
the way back `release_journal`, each platform's part `release_cloudrun` and `release_fly`.
"""

from __future__ import annotations

import shlex
import sys

from invoke import Context, Exit, task

from toolkit import release_cloudrun, release_fly, release_journal as journal
from toolkit.release_core import make_plan

PLATFORMS = {
    "cloudrun": release_cloudrun,  # a tagged revision of the serving digest, traffic in steps judged on Monitoring
    "fly": release_fly,  # one blue-green deploy of the serving image with only the model changed
}


def platform(target: str):
    try:
        return PLATFORMS[target]
    except KeyError:
        raise Exit(f"unknown target {target!r} for a release: use one of {', '.join(PLATFORMS)}") from None


def rollback_release(c: Context, target: str, dry_run: bool) -> bool:
    """`invoke rollback` after a release: back to where the journal's newest release started when it was held or
    interrupted, or to the model before the last promotion (True); else False (nothing released)."""
    if target not in PLATFORMS:
        return False
    entry = journal.unfinished(c, target)
    if entry is not None and journal.in_flight(entry) and not dry_run:
        raise Exit(f"the release of {entry['model']['uri']} is still running (pid {entry['pid']}): Ctrl-C it (or "
                   f"`kill {entry['pid']}`), and it goes back by itself")
    if entry is None:
        entry = journal.last_release(c, target)
        if entry is None:
            return False
        if not dry_run and not platform(target).still_serving(c, entry):
            print(f"the last release ({entry['model']['uri']}) no longer serves as released: rolling back the deploy")
            return False
        print(f"rolling back the release of {entry['model']['uri']} ({entry['released_at']}) to "
              f"{entry['previous']['uri']}")
    else:
        print(f"going back from the {entry['state']} release of {entry['model']['uri']} to where it started")
    command, done = platform(target).rollback_command(c, entry)
    c.run(shlex.join(command), dry=dry_run)
    if not dry_run:
        print(done)
        journal.rolled_back_by_hand(c, entry, done)
    return True


@task(
    help={
        "target": "cloudrun (traffic in steps, judged on Cloud Monitoring) or fly (one blue-green deploy)",
        "model": "the new model: gs://BUCKET/PATH.onnx#GENERATION (or without #GENERATION, with --sha256)",
        "sha256": "the model's sha256: the service refuses any other file; names the release without a generation",
        "samples": "JSONL file of /predict bodies for the compare, the smoke test and the answers check "
                   "(default: release.samples)",
        "steps": "Cloud Run: traffic percents to the new model, e.g. 10,50,100 (default: release.steps)",
        "step_wait": "Cloud Run: seconds each step serves before Cloud Monitoring judges it "
                     "(default: release.step_wait)",
        "skip_compare": "do not compare the new model with the serving one first (said loudly)",
        "dry_run": "print every command and query instead of running it",
    }
)
def release(c, target, model, sha256="", samples="", steps="", step_wait=None, skip_compare=False, dry_run=False):
    """Release a new model on the serving image (no build): compare it, smoke-test it, then move traffic to it."""
    module = platform(target)
    plan = make_plan(c, target, model, sha256, samples, steps, step_wait, skip_compare, dry_run or c.config.run.dry)
    module.release(c, plan, samples or c.release.samples)


@task(
    help={
        "target": "cloudrun (revisions and their traffic) or fly (machines)",
        "json": "print one JSON document instead of the table",
    }
)
def status(c, target, json=False):
    """Show what serves (revisions or machines, traffic, image, model) and a release that did not end, with its fix."""
    module = platform(target)
    module.status(c, as_json=json)
    entry = journal.unfinished(c, target)
    if entry is not None:  # beside the JSON document, not in it: stdout stays one document
        print(journal.describe_unfinished(entry, module.finish_hint(entry)), file=sys.stderr if json else sys.stdout)
