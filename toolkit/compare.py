"""`invoke model.compare`: a candidate model against a baseline, on this machine, before it serves anything.

Each model is loaded the way the service loads it (service/model_store.py: download, sha256 check, session with
the service's thread settings, warm-up), so a candidate the service would refuse fails here with the same reason.
Then three things, side by side: the signature (what would break a client), the outputs on the same requests
(drift, held only to the thresholds the user gives) and the speed (measured in one run, alternating).

`diff_outputs` works on /predict answers as JSON gives them, so `release` uses it on HTTP answers too.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invoke import Exit, task

MAX_ROWS = 64  # the batch size of the throughput figure, the service's default MAX_BATCH_ROWS
SEEDED_REQUESTS = 64
SEED = 0
SPEED_SECONDS = 2.0  # each of the single-row and the 64-row measurements, both models together
MIN_ROUNDS, MAX_ROUNDS = 20, 200_000  # a model of microseconds still runs for the whole time
ROLES = ("baseline", "candidate")


class CompareError(Exception):
    """A model that cannot be read or loaded, or input the comparison cannot use; the message says why."""


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float | None = None  # fail when any numeric output's max |a-b| is over it
    min_agreement: float | None = None  # fail when arg-max / exact agreement of any output is under it (0..1)
    max_latency_ratio: float | None = None  # fail when candidate/baseline single-row p50 (or p99) is over it

    def __post_init__(self) -> None:
        for name, value in (("max_abs_diff", self.max_abs_diff), ("max_latency_ratio", self.max_latency_ratio)):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise CompareError(f"{name} is {value}; give a number of 0 or more, or leave it unset for no gate")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise CompareError(
                f"min_agreement is {self.min_agreement}; give a fraction between 0 and 1 (0.99 for 99%), or leave "
                "it unset for no gate"
            )

    def as_json(self) -> dict[str, float | None]:
        return {"max_abs_diff": self.max_abs_diff, "min_agreement": self.min_agreement,
                "max_latency_ratio": self.max_latency_ratio}  # fmt: skip


def parse_threshold(name: str, value: Any) -> float | None:
    """A gate's limit from a flag or invoke.yaml: "" or None is no gate."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CompareError(f"{name} is {value!r}, not a number; give e.g. 0.01, or leave it unset for no gate") from None


def thresholds_from_config(c: Any) -> Thresholds:
    """The gates in invoke.yaml: release.max_abs_diff, release.min_agreement, release.max_latency_ratio."""
    release = c.get("release", None) or {}
    return Thresholds(
        **{name: parse_threshold(f"release.{name}", release.get(name)) for name in Thresholds.__dataclass_fields__}
    )


def thresholds_from_flags(c: Any, max_abs_diff: Any, min_agreement: Any, max_latency_ratio: Any) -> Thresholds:
    """The gates of a task: each flag given wins, the others come from invoke.yaml (thresholds_from_config)."""
    configured = thresholds_from_config(c)
    flags = {"max_abs_diff": max_abs_diff, "min_agreement": min_agreement, "max_latency_ratio": max_latency_ratio}
    return Thresholds(**{
        name: getattr(configured, name) if value is None else parse_threshold(f"--{name.replace('_', '-')}", value)
        for name, value in flags.items()
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Loading: the service's own ModelStore, run to the end in this process.


@dataclass
class LoadedModel:
    role: str
    uri: str
    store: Any  # service.model_store.ModelStore, ready

    @property
    def names(self) -> tuple[set[str], set[str]]:
        return {s.name for s in self.store.inputs}, {s.name for s in self.store.outputs}

    def describe(self) -> dict[str, Any]:
        status = self.store.status
        return {"uri": self.uri, "sha256": status.sha256, "generation": status.generation,
                "size_bytes": status.size_bytes, "load_seconds": self.store.health()["load_seconds"],
                "warnings": list(status.warnings)}  # fmt: skip

    def feeds(self, body: dict) -> dict:
        """A /predict body as this model's tensors, checked as the service checks it (payload.BadRequest if not).
        Seeded requests carry the other model's inputs too: only this one's are kept."""
        import orjson

        from service.payload import decode_inputs

        inputs = body.get("inputs")
        if isinstance(inputs, dict):
            body = {"inputs": {k: v for k, v in inputs.items() if k in self.names[0]}}
        return decode_inputs(orjson.dumps(body), self.store.inputs)

    def predict(self, body: dict) -> dict:
        """The /predict answer's `outputs` for a /predict body, as the service decodes, runs and encodes it
        (raises payload.BadRequest for a request the service would refuse)."""
        import orjson

        from service.payload import encode_outputs, rejected_by_model

        feeds = self.feeds(body)
        try:
            values = self.store.run(feeds)
        except Exception as exc:
            raise rejected_by_model(exc, self.store.inputs, feeds) from None
        return orjson.loads(encode_outputs(self.store.outputs, values))["outputs"]

    def seeded_metadata(self) -> dict:
        """The model's /metadata, its free dimensions past the first sized as in the input its warm-up ran (a model
        that needs 16 audio samples gets 16), so seeded requests are ones it takes."""
        metadata = self.store.metadata()
        example = self.store.example or {}
        for spec in metadata["inputs"]:
            if spec["name"] in example:
                sizes = example[spec["name"]].shape
                shape = enumerate(spec["shape"])
                spec["shape"] = [d if axis == 0 or isinstance(d, int) else sizes[axis] for axis, d in shape]
        return metadata


def load_model(role: str, uri: str, sha256: str, warmup_input: str, cache_dir: Path) -> LoadedModel:
    """Fetch, verify, open and warm up the model as a service worker does; CompareError with the service's reason."""
    from pydantic import ValidationError

    from service.model_store import LoadState, ModelStore
    from service.settings import Settings

    try:
        # Unset here, WARMUP_INPUT and the thread settings come from the environment, as the service reads them.
        given = {"warmup_input": warmup_input} if warmup_input else {}
        settings = Settings(model_uri=uri, model_sha256=sha256, model_cache_dir=cache_dir, **given)
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise CompareError(f"the {role} {uri}: {reasons}") from None
    model_log = logging.getLogger("service.model")
    if not model_log.handlers:  # warnings go into the report, not as stray lines on stderr
        model_log.addHandler(logging.NullHandler())
    store = ModelStore(settings)
    store.load()
    if store.status.state is not LoadState.READY:
        raise CompareError(f"the {role} {uri} cannot be served: {store.status.error}")
    return LoadedModel(role, uri, store)


# ---------------------------------------------------------------------------------------------------------------
# Signature: what a client of the baseline would see change.


def diff_signature(baseline: Any, candidate: Any) -> dict[str, Any]:
    """Inputs and outputs side by side (TensorSpecs of each model); breaking and compatible changes, one line each."""
    document: dict[str, Any] = {"inputs": [], "outputs": [], "breaking": [], "compatible": []}
    for kind, old_specs, new_specs in (("input", baseline.inputs, candidate.inputs),
                                       ("output", baseline.outputs, candidate.outputs)):  # fmt: skip
        old, new = {s.name: s for s in old_specs}, {s.name: s for s in new_specs}
        removed = [n for n in old if n not in new]
        added = [n for n in new if n not in old]
        renamed = {}
        if len(removed) == 1 and len(added) == 1 and _same_type(old[removed[0]], new[added[0]]):
            renamed[removed[0]] = added[0]
        for name in [*old, *added]:
            a, b = old.get(name), new.get(name)
            old_name = next((o for o, n in renamed.items() if n == name), None)
            if old_name:  # the breaking change is told on the old name's line
                changes, breaking = [f"{kind} {name!r} is {old_name!r} renamed"], True
            else:
                changes, breaking = _spec_changes(kind, name, a, b, renamed)
                document["breaking" if breaking else "compatible"].extend(changes)
            document[f"{kind}s"].append({
                "name": name, "baseline": a.as_json() if a else None, "candidate": b.as_json() if b else None,
                "changes": changes, "breaking": breaking,
            })  # fmt: skip
    return document


def _same_type(a: Any, b: Any) -> bool:
    return a.ort_type == b.ort_type and len(a.shape) == len(b.shape)


def _spec_changes(kind: str, name: str, a: Any, b: Any, renamed: dict[str, str]) -> tuple[list[str], bool]:
    if a is None:
        if kind == "input":
            return [f"new required input {name!r} ({b.dtype_name} {b.describe_shape()})"], True
        return [f"output {name!r} added ({b.dtype_name} {b.describe_shape()})"], False
    if b is None:
        if name in renamed:
            return [f"{kind} {name!r} renamed to {renamed[name]!r}"], True
        return [f"{kind} {name!r} removed"], True
    if a.ort_type != b.ort_type:
        return [f"{kind} {name!r} dtype {a.dtype_name} -> {b.dtype_name}"], True
    if len(a.shape) != len(b.shape):
        shapes = f"{a.describe_shape()} -> {b.describe_shape()}"
        return [f"{kind} {name!r} rank {len(a.shape)} -> {len(b.shape)} ({shapes})"], True
    changes, breaking = [], False
    for axis, (old, new) in enumerate(zip(a.shape, b.shape)):
        fixed_old, fixed_new = isinstance(old, int), isinstance(new, int)
        where = f"{kind} {name!r} dimension {axis}"
        if fixed_old and fixed_new and old != new:
            changes.append(f"{where} {old} -> {new}")
            breaking = True
        elif fixed_old and not fixed_new:
            changes.append(f"{where} {old} made free ({new or 'N'})")
        elif fixed_new and not fixed_old:
            # An input that took any size now takes one; an output only gets more precise.
            changes.append(f"{where} free ({old or 'N'}) made fixed {new}")
            breaking = breaking or kind == "input"
    return changes, breaking


# ---------------------------------------------------------------------------------------------------------------
# Outputs: drift on /predict-style answers (decoded JSON), one dict per request.


def diff_outputs(baseline: list[dict | None], candidate: list[dict | None]) -> dict[str, dict]:
    """Per output name, the drift between two models' answers to the same requests, as /predict's `outputs`
    objects (nested lists, strings, skl2onnx's ZipMap lists of {label: p}); None for a request one side did not
    answer. Numbers: max absolute and relative difference (relative to the baseline's value, at least 1e-6);
    2-D float outputs and ZipMap scores: agreement of the arg-max per row; integers, booleans, strings and
    anything else: exact agreement per element (per request for what is not a tensor)."""
    import numpy as np

    names = list(dict.fromkeys(n for answers in (baseline, candidate) for a in answers if a for n in a))
    result: dict[str, dict] = {}
    for name in names:
        figures: dict[str, Any] = {"requests": 0, "shape_mismatches": 0}
        counts = {"argmax": [0, 0], "exact": [0, 0]}  # [agreeing, compared]
        abs_diff = rel_diff = 0.0
        numeric = False
        kind = ""
        for a_out, b_out in zip(baseline, candidate):
            if a_out is None or b_out is None:
                continue
            if name not in a_out or name not in b_out:
                figures["only_in"] = "baseline" if name in a_out else "candidate"
                continue
            figures["requests"] += 1
            a, b, kind = _as_arrays(a_out[name], b_out[name])
            if a is None or b is None:  # not a tensor either side can be read as: compare the JSON values
                counts["exact"][0] += int(a_out[name] == b_out[name])
                counts["exact"][1] += 1
                continue
            if a.shape != b.shape:
                figures["shape_mismatches"] += 1
                continue
            if kind in ("float", "scores"):
                numeric = True
                with np.errstate(invalid="ignore", over="ignore"):
                    diff = np.abs(a - b)
                    diff[np.isnan(a) & np.isnan(b)] = 0.0
                    diff[np.isnan(diff)] = np.inf
                    if diff.size:
                        abs_diff = max(abs_diff, float(diff.max()))
                        rel_diff = max(rel_diff, float((diff / np.maximum(np.abs(np.nan_to_num(a)), 1e-6)).max()))
                if a.ndim == 2 and a.shape[1] > 1:
                    agree = np.argmax(np.nan_to_num(a, nan=-np.inf), 1) == np.argmax(np.nan_to_num(b, nan=-np.inf), 1)
                    counts["argmax"][0] += int(agree.sum())
                    counts["argmax"][1] += agree.size
            else:
                equal = a == b
                counts["exact"][0] += int(np.sum(equal))
                counts["exact"][1] += int(np.size(equal))
        figures["kind"] = kind or "other"
        if numeric:
            figures["max_abs_diff"] = _finite(abs_diff)
            figures["max_rel_diff"] = _finite(rel_diff)
        if counts["argmax"][1]:
            figures["argmax_agreement"] = counts["argmax"][0] / counts["argmax"][1]
            figures["argmax_rows"] = counts["argmax"][1]
        if counts["exact"][1]:
            figures["agreement"] = counts["exact"][0] / counts["exact"][1]
            figures["compared_values"] = counts["exact"][1]
        result[name] = figures
    return result


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"  # JSON has no infinity


def _as_arrays(a: Any, b: Any) -> tuple[Any, Any, str]:
    """Both answers as numpy arrays and their kind: float, integer, bool, string, or scores (ZipMap rows of
    {label: p}, as columns of the labels either side has)."""
    import numpy as np

    if _is_zipmap(a) and _is_zipmap(b):
        labels = sorted({label for row in (*a, *b) for label in row})
        return (np.array([[row.get(label, np.nan) for label in labels] for row in a], dtype=float),
                np.array([[row.get(label, np.nan) for label in labels] for row in b], dtype=float), "scores")  # fmt: skip
    arrays = []
    for value in (a, b):
        try:
            array = np.asarray(value)
        except ValueError:  # uneven nesting: not a tensor
            return None, None, "other"
        if array.dtype.kind == "O":  # orjson writes NaN and infinities as null
            try:
                array = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                return None, None, "other"
        arrays.append(array)
    kinds = {array.dtype.kind for array in arrays}
    if kinds <= {"U"}:
        kind = "string"
    elif kinds <= {"b"}:
        kind = "bool"
    elif kinds <= {"i", "u"}:
        kind = "integer"
    elif kinds <= {"f", "i", "u", "b"}:
        return arrays[0].astype(float), arrays[1].astype(float), "float"
    else:
        return None, None, "other"
    return arrays[0], arrays[1], kind


def _is_zipmap(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)


# ---------------------------------------------------------------------------------------------------------------
# Requests: the user's samples, or seeded ones built from the models' metadata.


def read_samples(path: str) -> list[dict]:
    """A JSONL file of /predict bodies, one a line (blank lines skipped)."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise CompareError(f"cannot read the samples file {path} ({exc.strerror}): give a JSONL file of /predict bodies")
    bodies = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as exc:
            raise CompareError(f"{path} line {number} is not JSON ({exc}): each line must be one /predict body") from None
        if not isinstance(body, dict) or "inputs" not in body:
            raise CompareError(f'{path} line {number} has no "inputs": each line must be a /predict body, '
                               '{"inputs": {"<input name>": [[...]]}}')  # fmt: skip
        bodies.append(body)
    if not bodies:
        raise CompareError(f"{path} holds no request: give one /predict body a line")
    return bodies


def seeded_requests(baseline: LoadedModel, candidate: LoadedModel, count: int, seed: int) -> list[dict]:
    """`count` single-row requests of seeded values for the inputs of both models (each model takes its own),
    built as the smoke test builds its request from /metadata; the warm-up example first when the service has one."""
    import numpy as np

    from toolkit.smoke import sample_request

    inputs = {spec["name"]: spec for model in (candidate, baseline) for spec in model.seeded_metadata()["inputs"]}
    metadata = {"inputs": list(inputs.values())}
    rng = np.random.default_rng(seed)
    requests = [sample_request(metadata, 1, rng) for _ in range(count)]
    if baseline.store.settings.warmup_input:
        example = {name: value.tolist() for name, value in (baseline.store.example or {}).items()}
        requests.insert(0, {"inputs": example})
    return requests


def first_refused(model: LoadedModel, bodies: list[dict]) -> tuple[int, Exception] | None:
    """The first body (numbered from 1) the model refuses, with the service's reason; None when it takes them all."""
    from service.payload import BadRequest

    for number, body in enumerate(bodies, 1):
        try:
            model.predict(body)
        except BadRequest as exc:
            return number, exc
    return None


def run_requests(models: dict[str, LoadedModel], requests: list[dict]) -> tuple[dict[str, list], dict[str, list]]:
    """Every request on each model: answers (None where refused) and the reasons of the refusals, by role."""
    from service.payload import BadRequest

    answers: dict[str, list] = {role: [] for role in models}
    errors: dict[str, list] = {role: [] for role in models}
    for number, body in enumerate(requests, 1):
        for role, model in models.items():
            try:
                answers[role].append(model.predict(body))
            except BadRequest as exc:
                answers[role].append(None)
                errors[role].append(f"request {number}: {exc}")
    return answers, errors


def refused_by_candidate_only(answers: dict[str, list], errors: dict[str, list]) -> list[str]:
    """The candidate's refusals of requests the baseline answered: what its clients would see fail after a switch."""
    numbers = {f"request {i}" for i, (a, b) in enumerate(zip(answers["baseline"], answers["candidate"]), 1)
               if a is not None and b is None}  # fmt: skip
    return [error for error in errors["candidate"] if error.partition(": ")[0] in numbers]


# ---------------------------------------------------------------------------------------------------------------
# Speed: both models in one run, alternating, on the sessions the service would open (its thread settings).


def speed_feeds(model: LoadedModel, rows: int, seed: int) -> tuple[dict | None, str]:
    """Seeded feeds of `rows` rows the model runs, or None and why not."""
    import numpy as np

    from service.payload import BadRequest
    from toolkit.smoke import sample_request

    metadata = model.seeded_metadata()
    if rows > 1 and any(not spec["shape"] or isinstance(spec["shape"][0], int) for spec in metadata["inputs"]):
        return None, "an input's first dimension is fixed, so it takes no batch of rows"
    body = sample_request(metadata, rows, np.random.default_rng(seed))
    try:
        model.predict(body)
    except BadRequest as exc:
        return None, f"the seeded input was refused ({exc}); give --warmup-input with a real example"
    return model.feeds(body), ""


def time_alternating(models: dict[str, LoadedModel], feeds: dict[str, dict], seconds: float) -> dict[str, list[float]]:
    """Seconds of each session.run, the models taking turns (the order swapped every round) for about `seconds`
    in all: a machine that slows down slows both alike."""
    times: dict[str, list[float]] = {role: [] for role in feeds}
    order = list(feeds)
    for model_role in order:  # one untimed run each: caches and thread pools warm
        models[model_role].store.run(feeds[model_role])
    started = time.perf_counter()
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or time.perf_counter() - started < seconds):
        for role in order if rounds % 2 == 0 else reversed(order):
            run = models[role].store.run
            begin = time.perf_counter()
            run(feeds[role])
            times[role].append(time.perf_counter() - begin)
        rounds += 1
    return times


def measure_speed(models: dict[str, LoadedModel], seconds: float, seed: int) -> dict[str, Any]:
    import numpy as np

    threads = models["baseline"].store.settings.intra_op_threads
    document: dict[str, Any] = {"intra_op_threads": threads, "batch_rows": MAX_ROWS}
    for label, rows in (("single_row", 1), ("batch", MAX_ROWS)):
        feeds, reasons = {}, {}
        for role, model in models.items():
            feeds[role], reasons[role] = speed_feeds(model, rows, seed)
        if any(f is None for f in feeds.values()):
            document[label] = {"skipped": "; ".join(f"{role}: {why}" for role, why in reasons.items() if why)}
            continue
        times = time_alternating(models, feeds, seconds)
        figures: dict[str, Any] = {"runs": len(times["baseline"])}
        for role, samples in times.items():
            array = np.array(samples)
            if rows == 1:
                figures[role] = {"p50_ms": float(np.percentile(array, 50) * 1e3),
                                 "p99_ms": float(np.percentile(array, 99) * 1e3)}  # fmt: skip
            else:
                figures[role] = {"rows_per_second": float(rows * len(array) / array.sum())}
        if rows == 1:
            figures["p50_ratio"] = figures["candidate"]["p50_ms"] / figures["baseline"]["p50_ms"]
            figures["p99_ratio"] = figures["candidate"]["p99_ms"] / figures["baseline"]["p99_ms"]
        else:
            figures["rows_per_second_ratio"] = (
                figures["candidate"]["rows_per_second"] / figures["baseline"]["rows_per_second"]
            )
        document[label] = figures
    return document


# ---------------------------------------------------------------------------------------------------------------
# The report and its gates.


@dataclass
class CompareReport:
    document: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        return render_text(self.document)


def compare_models(
    candidate: str,
    baseline: str,
    *,
    samples: str = "",
    thresholds: Thresholds = Thresholds(),
    allow_breaking: bool = False,
    candidate_sha256: str = "",
    baseline_sha256: str = "",
    warmup_input: str = "",
    speed_seconds: float = SPEED_SECONDS,
    seed: int = SEED,
) -> CompareReport:
    """Load both models as the service would, and compare signature, outputs and speed against the gates.

    Raises CompareError when a model cannot be loaded (with the service's reason) or the samples are unusable."""
    import onnxruntime

    from service.settings import parse_model_uri

    bodies = read_samples(samples) if samples else None  # cheap checks before the downloads

    onnxruntime.set_default_logger_severity(4)  # refused requests are counted in the report, not logged as errors
    for role, uri in (("candidate", candidate), ("baseline", baseline)):
        try:
            parse_model_uri(uri)
        except ValueError as exc:
            raise CompareError(f"the {role} {uri}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="model-compare-") as cache:
        # The candidate first: it is the one more likely to be refused, and the baseline may be a long download.
        loaded = load_model("candidate", candidate, candidate_sha256, warmup_input, Path(cache) / "candidate")
        models = {"baseline": load_model("baseline", baseline, baseline_sha256, warmup_input, Path(cache) / "baseline"),
                  "candidate": loaded}  # fmt: skip
        signature = diff_signature(models["baseline"].store, models["candidate"].store)
        if bodies is not None:
            requests, source = bodies, f"{len(bodies)} request(s) from {samples}"
        else:
            requests = seeded_requests(models["baseline"], models["candidate"], SEEDED_REQUESTS, seed)
            source = f"{len(requests)} seeded single-row request(s) (seed {seed})"
            if models["baseline"].store.settings.warmup_input:
                source += ", the warm-up input first"
        answers, errors = run_requests(models, requests)
        if bodies is not None and len(errors["baseline"]) == len(bodies):
            raise CompareError(f"the baseline refused every request of {samples}: {errors['baseline'][0]}")
        outputs = diff_outputs(answers["baseline"], answers["candidate"])
        latency = measure_speed(models, speed_seconds, seed)
        document: dict[str, Any] = {
            "models": {role: model.describe() for role, model in models.items()},
            "signature": signature,
            "outputs": outputs,
            "requests": {
                "source": source, "count": len(requests), "errors": errors,
                "answered": {role: sum(a is not None for a in answers[role]) for role in ROLES},
                # what a client of the baseline would see fail after the switch
                "refused_by_candidate_only": refused_by_candidate_only(answers, errors),
            },
            "latency": latency,
            "thresholds": thresholds.as_json(),
            "allow_breaking": allow_breaking,
        }
    failures = gate_failures(document, thresholds, allow_breaking)
    document["verdict"] = "fail" if failures else "pass"
    document["failures"] = failures
    return CompareReport(document, failures)


def gate_failures(document: dict[str, Any], thresholds: Thresholds, allow_breaking: bool) -> list[str]:
    """Each failed gate as one line: the figure and the limit."""
    failures = []
    breaking = document["signature"]["breaking"]
    if breaking and not allow_breaking:
        failures += [f"breaking signature change: {change} (pass --allow-breaking to accept it)" for change in breaking]
    requests = document["requests"]
    if not requests["answered"]["baseline"]:
        failures.append(f"no output compared: the baseline refused all {requests['count']} requests "
                        f"({requests['errors']['baseline'][0]}); give --samples FILE or --warmup-input with real ones")  # fmt: skip
    refused = requests["refused_by_candidate_only"]
    if refused and not (breaking and allow_breaking):
        failures.append(f"the candidate refused {len(refused)} of {requests['answered']['baseline']} requests the "
                        f"baseline answered: {refused[0]}")  # fmt: skip
    for name, figures in document["outputs"].items():
        if "only_in" in figures:
            continue
        limit = thresholds.max_abs_diff
        if limit is not None:
            if figures["shape_mismatches"]:
                failures.append(f"output {name!r}: shapes differ on {figures['shape_mismatches']} request(s), so no "
                                f"drift figure holds to max_abs_diff {limit:g}")  # fmt: skip
            elif "max_abs_diff" in figures and _over(figures["max_abs_diff"], limit):
                failures.append(f"output {name!r}: max abs diff {_num(figures['max_abs_diff'])} is over the limit "
                                f"{limit:g} (max_abs_diff)")  # fmt: skip
        limit = thresholds.min_agreement
        if limit is not None:
            for key, what in (("argmax_agreement", "arg-max agreement"), ("agreement", "agreement")):
                if key in figures and figures[key] < limit:
                    failures.append(f"output {name!r}: {what} {figures[key]:.2%} is under the limit {limit:.2%} "
                                    "(min_agreement)")  # fmt: skip
            if figures["shape_mismatches"] and not any(k in figures for k in ("argmax_agreement", "agreement")):
                failures.append(f"output {name!r}: shapes differ on {figures['shape_mismatches']} request(s), so no "
                                f"agreement figure holds to min_agreement {limit:.2%}")  # fmt: skip
    limit = thresholds.max_latency_ratio
    if limit is not None:
        single = document["latency"].get("single_row", {})
        if "skipped" in single:
            failures.append(f"latency: not measured ({single['skipped']}), so max_latency_ratio {limit:g} cannot hold")
        for pct in ("p50", "p99"):
            ratio = single.get(f"{pct}_ratio")
            if ratio is not None and ratio > limit:
                failures.append(
                    f"latency: candidate single-row {pct} {single['candidate'][f'{pct}_ms']:.3f} ms is {ratio:.2f}x the "
                    f"baseline's {single['baseline'][f'{pct}_ms']:.3f} ms, over the limit {limit:g}x (max_latency_ratio)"
                )
    return failures


def _over(value: float | str, limit: float) -> bool:
    return value == "inf" or value > limit  # type: ignore[operator]


def _num(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def render_text(document: dict[str, Any]) -> str:
    """The human report: models, signature, outputs, speed, gates and verdict."""
    lines = []
    models = document["models"]
    for role in ROLES:
        m = models[role]
        generation = f" generation {m['generation']}" if m["generation"] and "#" not in m["uri"] else ""
        lines.append(f"{role:<9}  {m['uri']}{generation}  sha256 {(m['sha256'] or '')[:12]}  "
                     f"loaded in {m['load_seconds']:.2f}s")  # fmt: skip
        lines += [f"           warning: {_short(w)}" for w in m["warnings"]]
    signature = document["signature"]
    width = max([16, *(len(row["name"]) + 1 for kind in ("inputs", "outputs") for row in signature[kind])])
    lines += ["", "Signature (baseline -> candidate)"]
    for kind in ("inputs", "outputs"):
        for row in signature[kind]:
            old, new = (_spec_text(row[r]) for r in ROLES)
            state = ("BREAKING: " if row["breaking"] else "") + "; ".join(row["changes"]) if row["changes"] else "same"
            lines.append(f"  {kind[:-1]:<6} {row['name']:<{width}} {old:<22} -> {new:<22} {state}")
    if not signature["breaking"]:
        compatible = len(signature["compatible"])
        lines.append("  no breaking change" + (f"; {compatible} compatible" if compatible else ""))
    requests = document["requests"]
    lines += ["", f"Outputs on {requests['source']}"]
    for role in ROLES:
        if requests["errors"][role]:
            lines.append(f"  the {role} refused {len(requests['errors'][role])}: {_short(requests['errors'][role][0])}")
    for name, f in document["outputs"].items():
        if "only_in" in f and not f["requests"]:
            lines.append(f"  {name:<{width}} only the {f['only_in']} has it")
            continue
        parts = [f"{f['kind']:<7}"]
        if "max_abs_diff" in f:
            parts.append(f"max abs diff {_num(f['max_abs_diff'])}, max rel diff {_num(f['max_rel_diff'])}")
        if "argmax_agreement" in f:
            parts.append(f"arg-max agreement {f['argmax_agreement']:.2%} of {f['argmax_rows']} rows")
        if "agreement" in f:
            parts.append(f"exact agreement {f['agreement']:.2%} of {f['compared_values']} values")
        if f["shape_mismatches"]:
            parts.append(f"shapes differ on {f['shape_mismatches']} of {f['requests']} requests")
        lines.append(f"  {name:<{width}} " + "  ".join(parts))
    latency = document["latency"]
    lines += ["", f"Speed (alternating runs in one process, {latency['intra_op_threads']} intra-op thread(s) as the "
                  "service would use here)"]  # fmt: skip
    lines.append(f"  {'':<34} {'baseline':>12} {'candidate':>12} {'ratio':>8}")
    single, batch = latency["single_row"], latency["batch"]
    if "skipped" in single:
        lines.append(f"  single-row latency: not measured: {_short(single['skipped'])}")
    else:
        for pct in ("p50", "p99"):
            label = f"single-row {pct} ({single['runs']} runs)"
            lines.append(f"  {label:<34} "
                         f"{single['baseline'][f'{pct}_ms']:>9.3f} ms {single['candidate'][f'{pct}_ms']:>9.3f} ms "
                         f"{single[f'{pct}_ratio']:>7.2f}x")  # fmt: skip
    if "skipped" in batch:
        lines.append(f"  rows/s at {latency['batch_rows']}-row batches: not measured: {_short(batch['skipped'])}")
    else:
        label = f"rows/s, {latency['batch_rows']}-row batches ({batch['runs']} runs)"
        lines.append(f"  {label:<34} "
                     f"{batch['baseline']['rows_per_second']:>12,.0f} {batch['candidate']['rows_per_second']:>12,.0f} "
                     f"{batch['rows_per_second_ratio']:>7.2f}x")  # fmt: skip
    thresholds = document["thresholds"]
    gates = [f"{k} {v:g}" for k, v in thresholds.items() if v is not None]
    lines += ["", "Gates: " + (", ".join(gates) if gates else "none given (drift is reported, not judged)")
              + ("; breaking changes allowed" if document["allow_breaking"] else "")]  # fmt: skip
    if document["failures"]:
        lines.append(f"FAIL: {len(document['failures'])} gate(s) failed")
        lines += [f"  - {line}" for line in document["failures"]]
    else:
        lines.append("PASS: every gate holds")
    return "\n".join(lines)


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spec_text(spec: dict | None) -> str:
    if spec is None:
        return "-"
    if "(" in spec["dtype"]:  # a sequence or map: no tensor shape
        return spec["dtype"]
    return f"{spec['dtype']} [" + ", ".join(str(d) if isinstance(d, int) else (d or "N") for d in spec["shape"]) + "]"


@task(
    help={
        "candidate": "the new model: gs://BUCKET/PATH/model.onnx[#GENERATION] or a local path",
        "baseline": "the model it would replace (default: model.uri, what deploys serve)",
        "samples": "JSONL file of /predict bodies to compare outputs on; default: seeded requests from the metadata",
        "max_abs_diff": "fail when any numeric output differs by more than this (default: release.max_abs_diff)",
        "min_agreement": "fail when an output's arg-max or exact agreement is under this fraction, e.g. 0.99 "
                         "(default: release.min_agreement)",
        "max_latency_ratio": "fail when the candidate's single-row p50 or p99 is over this many times the baseline's "
                             "(default: release.max_latency_ratio)",
        "allow_breaking": "accept a breaking signature change (renamed or removed input/output, dtype, rank, ...)",
        "candidate_sha256": "refuse the candidate unless its sha256 is this (as MODEL_SHA256)",
        "baseline_sha256": "refuse the baseline unless its sha256 is this (default: model.sha256 for model.uri)",
        "warmup_input": "a /predict body (inline, path or gs://) both models warm up on, as the service's "
                        "WARMUP_INPUT (default: that variable); it is also the first compared request",
        "speed_seconds": f"seconds to time each of single-row and {MAX_ROWS}-row runs (default {SPEED_SECONDS:g})",
        "json": "print one JSON document (signature, outputs, latency, verdict, failures) instead of the report",
    }
)
def compare(
    c, candidate, baseline="", samples="", max_abs_diff=None, min_agreement=None, max_latency_ratio=None,
    allow_breaking=False, candidate_sha256="", baseline_sha256="", warmup_input="", speed_seconds=None, json=False,
):  # fmt: skip
    """Compare a candidate model with the baseline: signature, outputs and speed; exit 1 when a gate fails."""
    import json as json_module

    try:
        thresholds = thresholds_from_flags(c, max_abs_diff, min_agreement, max_latency_ratio)
        seconds = parse_threshold("--speed-seconds", speed_seconds) or SPEED_SECONDS
        if not baseline:
            baseline, baseline_sha256 = str(c.model.uri), baseline_sha256 or str(c.model.sha256 or "")
        if not json:
            print(f"comparing candidate {candidate} with baseline {baseline} ...", flush=True)
        report = compare_models(
            candidate, baseline, samples=samples, thresholds=thresholds, allow_breaking=allow_breaking,
            candidate_sha256=candidate_sha256, baseline_sha256=baseline_sha256, warmup_input=warmup_input,
            speed_seconds=seconds,
        )  # fmt: skip
    except CompareError as exc:
        if json:
            print(json_module.dumps({"verdict": "error", "failures": [str(exc)]}, indent=2))
        raise Exit(f"model.compare: {exc}", code=2) from None
    print(json_module.dumps(report.document, indent=2) if json else report.text())
    if not report.ok:
        raise Exit(code=1)
