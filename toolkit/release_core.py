"""What every release needs whatever the platform: the plan from the flags and config, the compare gate, the
candidate's answers over HTTP, the verdict on a traffic step, and what `status` reads from /health. The platforms'
parts are `release_cloudrun` and `release_fly`; the journal and the way back are `release_journal`; the tasks are
`release`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import httpx
from invoke import Context, Exit

from toolkit import smoke
from toolkit.monitoring import Figures


@dataclass
class Plan:
    """What one release does, from its flags and config, checked before anything runs."""

    target: str
    model: str
    sha256: str
    samples: list[dict] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    step_wait: float = 0.0
    skip_compare: bool = False
    dry_run: bool = False

    @property
    def pinned_id(self) -> str:
        """The model's storage generation, else the first 12 hex digits of its sha256."""
        generation = self.model.partition("#")[2]
        return generation or self.sha256[:12]


def parse_steps(text: str) -> list[int]:
    """`10,50,100` -> [10, 50, 100]: whole percents, ascending, ending at 100 (the promotion)."""
    try:
        steps = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise Exit(f"--steps {text!r} is not a list of whole percents: use e.g. 10,50,100") from None
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise Exit(f"--steps {text!r}: percents between 1 and 100, ascending, e.g. 10,50,100")
    return steps if steps[-1] == 100 else [*steps, 100]


def load_samples(path: str) -> list[dict]:
    """A JSONL file of /predict bodies, one a line, read as `model.compare` reads it."""
    if not path:
        return []
    from toolkit import compare

    try:
        return compare.read_samples(path)
    except compare.CompareError as exc:
        raise Exit(f"--samples: {exc}") from None


def make_plan(c: Context, target: str, model: str, sha256: str, samples: str, steps: str, step_wait,
              skip_compare: bool, dry_run: bool) -> Plan:
    if not model.startswith("gs://"):
        raise Exit(f"--model {model!r}: a release serves a model from Cloud Storage: upload it (`gcloud storage cp "
                   "model.onnx gs://BUCKET/model-v2.onnx`) and pass its gs:// URI.")
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise Exit(f"--sha256 {sha256!r} is not a sha256 hex digest (64 characters 0-9a-f): `sha256sum model.onnx`")
    generation = model.partition("#")[2]
    if generation and not generation.isdigit():
        raise Exit(f"--model {model!r}: #{generation} is not a storage generation (digits, as `gcloud storage "
                   "objects describe URI --format='value(generation)'` prints)")
    if not generation and not sha256:
        raise Exit(f"--model {model!r} names no version: pin it with #GENERATION or --sha256, so that every instance "
                   "serves the same model and the release has a name")
    return Plan(target, model, sha256, load_samples(samples or c.release.samples),
                parse_steps(steps or c.release.steps), float(c.release.step_wait if step_wait is None else step_wait),
                skip_compare, dry_run)


# ---- the compare gate --------------------------------------------------------------------------------------------


def compare_gate(c: Context, plan: Plan, baseline: str, baseline_sha256: str, samples_path: str,
                 warmup_input: str = "") -> None:
    """`model.compare` of the candidate against the serving model, on this machine; Exit on a failed gate."""
    if plan.skip_compare:
        print("!" * 100 + f"\n! --skip-compare: {plan.model} is NOT compared with the serving model {baseline}; "
              "a renamed output, a wrong model or a slower one goes out unchecked\n" + "!" * 100)
        return
    if plan.dry_run:
        print(f"# invoke model.compare --candidate {plan.model} --baseline {baseline}"
              + (f" --samples {samples_path}" if samples_path else ""))
        return
    from toolkit import compare

    print(f"compare: {plan.model} against the serving {baseline}")
    try:
        report = compare.compare_models(plan.model, baseline, samples=samples_path,
                                        thresholds=compare.thresholds_from_config(c),
                                        candidate_sha256=plan.sha256, baseline_sha256=baseline_sha256,
                                        warmup_input=warmup_input)
    except compare.CompareError as exc:
        raise Exit(f"release stopped before any change: the compare could not run: {exc}") from None
    print(report.text())
    if not report.ok:
        raise Exit("release stopped before any change: the candidate fails the compare: "
                   + "; ".join(report.failures))


def answers(url: str, samples: list[dict], reach: smoke.Access) -> list[dict]:
    """The `outputs` of /predict at URL for every sample, reached as every task reaches the service."""
    found = []
    with httpx.Client(headers=reach.headers, timeout=60) as client:
        for number, sample in enumerate(samples, 1):
            response = client.post(f"{url.rstrip('/')}/predict", json=sample)
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            if response.status_code != 200 or not isinstance(body.get("outputs"), dict):
                raise Exit(f"sample {number} answered {response.status_code} at {url}: {response.text[:200]}")
            found.append(body["outputs"])
    return found


def compare_answers(c: Context, serving_url: str, candidate_url: str, samples: list[dict],
                    reach: smoke.Access) -> None:
    """The candidate's answers to the samples against the serving revision's, over HTTP, held to the compare's
    output gates (release.max_abs_diff, release.min_agreement); Exit with the failed gates in one line."""
    if not samples:
        return
    import dataclasses

    from toolkit import compare

    drift = compare.diff_outputs(answers(serving_url, samples, reach), answers(candidate_url, samples, reach))
    for name, figures in drift.items():
        print(f"answers on {len(samples)} samples, output {name}: "
              + ", ".join(f"{key} {value}" for key, value in figures.items()))
    count = len(samples)
    document = {"signature": {"breaking": []}, "outputs": drift, "latency": {},
                "requests": {"count": count, "answered": {"baseline": count, "candidate": count},
                             "errors": {"baseline": [], "candidate": []}, "refused_by_candidate_only": []}}
    limits = dataclasses.replace(compare.thresholds_from_config(c), max_latency_ratio=None)  # speed: model.compare's
    failures = compare.gate_failures(document, limits, allow_breaking=False)
    failures += [f"output {name!r} is not in the candidate's answers" for name, figures in drift.items()
                 if figures.get("only_in") == "baseline"]
    if failures:
        raise Exit("; ".join(failures))


# ---- judging a traffic step ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    action: str  # "advance", "rollback" or "hold"
    reason: str


def judge(c: Context, candidate: Figures, stable: Figures) -> Verdict:
    """Advance, roll back or hold. Unhealthy beats too-few-requests (as in cloud-run-release-manager): a 5xx burst
    rolls back even on a thin step."""
    limits = c.release
    share, ceiling = candidate.error_share, float(limits.max_5xx_share)
    if candidate.requests and share > ceiling and share > stable.error_share:
        return Verdict("rollback", f"candidate {candidate.revision} answered 5xx to {100 * share:.2f}% of "
                                   f"{candidate.requests} requests (limit {100 * ceiling:.2f}%, stable "
                                   f"{100 * stable.error_share:.2f}%)")
    ratio = float(limits.max_p99_ratio)
    if candidate.p99_ms is not None and stable.p99_ms and candidate.p99_ms > ratio * stable.p99_ms:
        return Verdict("rollback", f"candidate {candidate.revision} p99 {candidate.p99_ms:.0f} ms is "
                                   f"{candidate.p99_ms / stable.p99_ms:.2f}x the stable {stable.p99_ms:.0f} ms "
                                   f"(limit {ratio}x)")
    if candidate.requests < int(limits.min_requests):
        return Verdict("hold", f"candidate {candidate.revision} had {candidate.requests} requests in the window, "
                               f"fewer than release.min_requests {limits.min_requests}: too few to judge")
    return Verdict("advance", f"candidate {candidate.describe()}; stable {stable.describe()}")


# ---- status: what serves --------------------------------------------------------------------------------------


def health_of(url: str, reach: smoke.Access, headers: dict | None = None) -> dict:
    """What the instance behind URL says it serves: model uri, generation, sha256, and build when reported."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=15, headers={**reach.headers, **(headers or {})})
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": f"/health did not answer: {type(exc).__name__}"}
    model = body.get("model") or {}
    found = {"status": body.get("status"), "uri": model.get("uri"), "generation": model.get("generation"),
             "sha256": model.get("sha256")}
    if isinstance(body.get("build"), dict):
        found["build"] = body["build"].get("revision")
    return found


def show(rows: list[dict], as_json: bool, kind: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    header = [kind.upper(), "TRAFFIC", "IMAGE DIGEST", "MODEL", "GENERATION", "SHA256", "BUILD"]
    table = [header]
    for row in rows:
        health = row["health"]
        digest = row["image"].partition("@")[2][:19] or row["image"]
        table.append([row[kind] + (f" ({', '.join(row['tags'])})" if row.get("tags") else ""), row["share"]
                      if "share" in row else f"{row['percent']}%", digest,
                      health.get("uri") or health.get("error", ""), str(health.get("generation") or "-"),
                      (health.get("sha256") or "-")[:12], health.get("build") or "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
