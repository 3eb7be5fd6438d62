"""`invoke model.optimize`: cheaper versions of a model, made with onnxruntime's own tools, each judged by the
engine of `model.compare` (toolkit/compare.py: signature, drift on the same requests, speed with the service's
threads), and the fastest one that holds every gate written where `invoke release` can take it.

The candidates (see CANDIDATES):
- optimized: the graph optimized offline at ORT_ENABLE_EXTENDED, saved with SessionOptions.optimized_model_filepath.
  Basic and extended optimizations are fusions any x86 CPU runs; the level above (layout optimizations, NCHWc) is
  fitted to the vector width of the CPU it runs on, so it is left to the serving machine, which applies it online
  (the service opens sessions at ORT_ENABLE_ALL).
  https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html (read 2026-12-06)
- int8-dynamic: onnxruntime.quantization.quantize_dynamic: int8 weights, activations quantized at run time from each
  run's range; meant for MatMul-heavy models (MLPs, transformers, RNNs).
- int8-static: onnxruntime.quantization.quantize_static in the QDQ format (S8S8, the tool's default and the first
  choice the docs give for CPU), its activation ranges calibrated on request bodies; meant for convolutional models.
  https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html (read 2026-12-06)

Each candidate is also run through the service's batching self-test (service/scheduler.py): a dynamically quantized
model takes its activations' range from the whole batch, so its rows may change when run together, and the service
then serves it unbatched. Its speed is then counted at single-row rate, as it would be served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from invoke import Exit, task

from toolkit import compare
from toolkit.compare import CompareError, LoadedModel, Thresholds

# Operators int8 makes cheaper: the ones that carry weights. Other operators in onnxruntime's registries (Relu,
# Reshape, ...) are quantized only around these.
WEIGHTED_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "LSTM", "EmbedLayerNormalization", "Gather"}
ONE_FILE_LIMIT = 2**31 - 2**24  # protobuf's 2 GB cap on one message, less room for the graph itself
GS_OUT = re.compile(r"^gs://(?P<bucket>[a-z0-9][a-z0-9._-]{1,221}[a-z0-9])/(?P<name>[^#]+)$")


class OptimizeError(CompareError):
    """Input the task cannot use (an --out it cannot write, samples the model refuses); the message says the fix."""


@dataclass
class Job:
    source: Path  # the original, a local file
    ops: set[str]  # its operator types
    calibration: list[dict]  # feeds (name -> numpy array) for static calibration
    calibration_source: str


@dataclass
class Candidate:
    name: str
    how: str
    path: Path | None = None
    not_made: str = ""  # why it does not apply, or why onnxruntime could not make it
    report: compare.CompareReport | None = None
    batching: dict[str, Any] = field(default_factory=dict)
    served_ratio: float | None = None  # rows/s as the service would run it, against the original's

    @property
    def ok(self) -> bool:
        return self.report is not None and self.report.ok

    def verdict(self) -> str:
        if self.report is None:
            return "not made"
        return "pass" if self.report.ok else "fail"


# ---------------------------------------------------------------------------------------------------------------
# Making the candidates, each with onnxruntime's own tooling.


def make_optimized(job: Job, target: Path) -> str:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(job.source), sess_options=options, providers=["CPUExecutionProvider"])
    return ""


def make_int8_dynamic(job: Job, target: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    covered = sorted(job.ops & WEIGHTED_OPS & set(IntegerOpsRegistry))
    if not covered:
        return _not_covered(job, IntegerOpsRegistry, "dynamic")
    with _quiet_quantization():
        quantize_dynamic(job.source, target, weight_type=QuantType.QInt8)
    return ""


def make_int8_static(job: Job, target: Path) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    covered = sorted(job.ops & WEIGHTED_OPS & set(QDQRegistry))
    if not covered:
        return _not_covered(job, QDQRegistry, "static")

    class Bodies(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(job.calibration)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with _quiet_quantization():
        quantize_static(job.source, target, Bodies(), quant_format=QuantFormat.QDQ)
    return ""


def _not_covered(job: Job, registry: dict, kind: str) -> str:
    return (f"does not apply: none of the model's operators ({', '.join(sorted(job.ops))}) is one int8 {kind} "
            f"quantization makes cheaper ({', '.join(sorted(WEIGHTED_OPS & set(registry)))})")  # fmt: skip


@contextmanager
def _quiet_quantization() -> Iterator[None]:
    """onnxruntime.quantization logs advice (pre-processing, shape inference) on the root logger: not the report's."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# One table: the candidate's name -> how it is made, and what the report says it is.
CANDIDATES: dict[str, tuple[Callable[[Job, Path], str], str]] = {
    "optimized": (make_optimized, "graph optimized offline at ORT_ENABLE_EXTENDED (no CPU-specific layout)"),
    "int8-dynamic": (make_int8_dynamic, "int8 dynamic quantization (quantize_dynamic, int8 weights)"),
    "int8-static": (make_int8_static, "int8 static quantization, QDQ (quantize_static), calibrated"),
}


def parse_candidates(value: str) -> list[str]:
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise OptimizeError(f"--candidates {value!r}: give a comma-separated list of {', '.join(CANDIDATES)}")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Where the chosen file goes: a local path (written to a temp file, then renamed) or a gs:// object.


@dataclass(frozen=True)
class Destination:
    given: str
    path: Path | None = None
    bucket: str = ""
    name: str = ""

    @property
    def is_gcs(self) -> bool:
        return bool(self.bucket)


def default_out(model_uri: str, candidate: str) -> str:
    """Beside the model, named after the candidate: models/mlp.onnx -> models/mlp.int8-dynamic.onnx."""
    head, _, _ = model_uri.partition("#")
    stem = head[: -len(".onnx")] if head.endswith(".onnx") else head
    return f"{stem}.{candidate}.onnx"


def parse_out(out: str, model_path: Path | None) -> Destination:
    """The destination, checked before anything slow: a local folder that exists and takes a new file, or a
    gs://BUCKET/OBJECT without #GENERATION (the upload makes the generation)."""
    if out.startswith("gs://"):
        match = GS_OUT.match(out)
        if not match:
            raise OptimizeError(f"--out {out!r} is not gs://BUCKET/PATH/model.onnx (without #GENERATION: the upload "
                                "makes a new generation, which the report prints)")  # fmt: skip
        return Destination(out, bucket=match["bucket"], name=match["name"])
    if "://" in out:
        raise OptimizeError(f"--out {out!r}: give a local path or gs://BUCKET/PATH/model.onnx")
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise OptimizeError(f"--out {out} is a folder: give a file name, e.g. {Path(out) / 'model.optimized.onnx'}")
    if model_path is not None and path.exists() and path.resolve() == model_path.resolve():
        raise OptimizeError(f"--out {out} is the model itself: give another file name, so the original stays")
    if not path.parent.is_dir():
        raise OptimizeError(f"--out {out}: the folder {path.parent} does not exist; create it or give another path")
    try:  # the one sure test: a file made there, and removed
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise OptimizeError(f"--out {out}: cannot write in {path.parent} ({exc.strerror}); give a path you can "
                            "write to") from None  # fmt: skip
    return Destination(out, path=path)


def write_local(source: Path, target: Path) -> None:
    """Copy to a temp file beside the target, flushed to disk, then rename: the target is whole or untouched."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
            shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OptimizeError(f"--out {target}: cannot write it ({exc.strerror or exc})") from None
        raise


def upload(source: Path, destination: Destination) -> int:
    """Upload the file as one object (Cloud Storage makes an object visible only once it is whole); its generation."""
    from google.api_core import exceptions as api_errors
    from google.auth import exceptions as auth_errors

    from service.model_store import storage_client

    try:
        blob = storage_client().bucket(destination.bucket).blob(destination.name)
        blob.upload_from_filename(str(source), content_type="application/octet-stream")
    except api_errors.NotFound:
        raise OptimizeError(f"--out {destination.given}: bucket {destination.bucket} does not exist; create it "
                            f"(`gcloud storage buckets create gs://{destination.bucket}`) or give another") from None  # fmt: skip
    except api_errors.Forbidden as exc:
        raise OptimizeError(f"--out {destination.given}: not allowed to write it ({exc.message}); grant "
                            "roles/storage.objectCreator on the bucket to the account you use") from None  # fmt: skip
    except auth_errors.DefaultCredentialsError:
        raise OptimizeError(f"--out {destination.given}: no Google credentials here; run `gcloud auth "
                            "application-default login`, or give a local --out") from None  # fmt: skip
    except api_errors.GoogleAPIError as exc:
        raise OptimizeError(f"--out {destination.given}: the upload failed ({exc}); nothing was written") from None
    return int(blob.generation)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Judging: the compare's engine, candidate against the original, and the service's batching self-test.


def batching(model: LoadedModel) -> dict[str, Any]:
    """Whether the service would batch this model's requests (its own self-test, with its settings)."""
    from service.scheduler import batch_safety

    store, settings = model.store, model.store.settings
    policy = batch_safety(store.run, store.inputs, store.outputs, settings.batching, settings.max_batch_rows,
                          settings.max_batch_delay_ms / 1000, example=store.example)  # fmt: skip
    return {"enabled": policy.enabled, "reason": policy.reason}


def served_rows_per_second(latency: dict[str, Any], role: str, batched: bool) -> float | None:
    """Rows a second as the service would run them: whole batches when it batches, else one row a run."""
    batch, single = latency.get("batch", {}), latency.get("single_row", {})
    if batched and role in batch:
        return batch[role]["rows_per_second"]
    if role in single:
        return 1000.0 / single[role]["p50_ms"]
    return None


def served_ratio(candidate: Candidate, original_batched: bool) -> float | None:
    latency = candidate.report.document["latency"]  # type: ignore[union-attr]
    mine = served_rows_per_second(latency, "candidate", candidate.batching["enabled"])
    theirs = served_rows_per_second(latency, "baseline", original_batched)
    return mine / theirs if mine and theirs else None


def read_bodies(path: str, what: str, model: LoadedModel) -> list[dict]:
    """A JSONL file of /predict bodies the model takes; OptimizeError naming the first line it refuses."""
    try:
        bodies = compare.read_samples(path)
    except CompareError as exc:
        raise OptimizeError(f"{what}: {exc}") from None
    if refused := compare.first_refused(model, bodies):
        number, exc = refused
        raise OptimizeError(f"{what} {path} request {number}: the model refuses it ({exc}); give /predict "
                            "bodies this model answers")  # fmt: skip
    return bodies


@dataclass
class OptimizeReport:
    document: dict[str, Any]
    candidates: list[Candidate]

    @property
    def ok(self) -> bool:
        return self.document["chosen"] is not None

    def text(self) -> str:
        return render_text(self.document)


def optimize_model(
    model_uri: str,
    *,
    model_sha256: str = "",
    samples: str = "",
    calibration: str = "",
    thresholds: Thresholds = Thresholds(),
    out: str = "",
    candidates: list[str] | None = None,
    speed_seconds: float = compare.SPEED_SECONDS,
) -> OptimizeReport:
    """Make each candidate, judge it against the original, and write the fastest that holds every gate to `out`
    (default: beside the model). Raises OptimizeError/CompareError on input it cannot use; writes nothing then."""
    import onnx
    import onnxruntime

    from service.settings import parse_model_uri

    names = candidates or list(CANDIDATES)
    try:
        parse_model_uri(model_uri)
    except ValueError as exc:
        raise OptimizeError(f"--model {model_uri}: {exc}") from None
    local_model = None if model_uri.startswith("gs://") else Path(model_uri).expanduser()
    # Checked before the download and the slow part (a default out: its folder, the one every candidate's name shares).
    parse_out(out or default_out(model_uri, names[0]), local_model)
    onnxruntime.set_default_logger_severity(4)
    with tempfile.TemporaryDirectory(prefix="model-optimize-") as work_dir:
        work = Path(work_dir)
        original = compare.load_model("model", model_uri, model_sha256, "", work / "original")
        source = original.store.path
        assert source is not None
        bodies = read_bodies(samples, "--samples", original) if samples else None
        if calibration:
            calibration_bodies = read_bodies(calibration, "--calibration", original)
            calibration_source = f"{len(calibration_bodies)} request(s) from {calibration}"
        elif bodies is not None:
            calibration_bodies, calibration_source = bodies, f"the {len(bodies)} sample(s) of {samples}"
        else:
            calibration_bodies = compare.seeded_requests(original, original, compare.SEEDED_REQUESTS, compare.SEED)
            calibration_source = f"{len(calibration_bodies)} seeded request(s), as model.compare makes them"
        graph = onnx.load(str(source), load_external_data=False).graph
        ops = {node.op_type for node in graph.node}
        job = Job(one_file(source, graph, original.store.status.size_bytes, work), ops,
                  [original.feeds(body) for body in calibration_bodies], calibration_source)  # fmt: skip
        original_batching = batching(original)

        judged: list[Candidate] = []
        for name in names:
            make, how = CANDIDATES[name]
            candidate = Candidate(name, how + (f" on {calibration_source}" if name == "int8-static" else ""))
            judged.append(candidate)
            path = work / "candidates" / f"{name}.onnx"
            path.parent.mkdir(exist_ok=True)
            try:
                candidate.not_made = make(job, path)
            except Exception as exc:  # onnxruntime's tools refuse some graphs: said in the table, the others go on
                candidate.not_made = f"onnxruntime could not make it ({type(exc).__name__}: {_first_line(exc)})"
            if candidate.not_made:
                continue
            try:
                report = compare.compare_models(
                    str(path), str(source), samples=samples, thresholds=thresholds,
                    baseline_sha256=original.store.status.sha256, speed_seconds=speed_seconds,
                )  # fmt: skip
                loaded = compare.load_model("candidate", str(path), "", "", work / "loaded" / name)
            except CompareError as exc:  # made, but not servable: that candidate is out, the others go on
                candidate.not_made = f"made, but {exc}"
                continue
            candidate.path, candidate.report = path, report
            candidate.batching = batching(loaded)
            candidate.served_ratio = served_ratio(candidate, original_batching["enabled"])

        passing = [c for c in judged if c.ok]
        chosen = max(passing, key=lambda c: c.served_ratio or 0.0) if passing else None
        written = write_chosen(chosen, out or default_out(model_uri, chosen.name), local_model) if chosen else None
        document = build_document(original, original_batching, job, bodies, samples, thresholds, judged, chosen,
                                  written)  # fmt: skip
    return OptimizeReport(document, judged)


def one_file(source: Path, graph: Any, size_bytes: int, work: Path) -> Path:
    """The model as a single file to make candidates from, so that each candidate is one file (the one `--out`
    names) rather than a graph that points at data files it does not carry. A model over protobuf's 2 GB cannot be
    one file: it is left as it is, and the tools say so in the candidates' rows."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    if size_bytes >= ONE_FILE_LIMIT or not any(uses_external_data(t) for t in graph.initializer):
        return source
    single = work / "original-one-file.onnx"
    onnx.save(onnx.load(str(source)), str(single))
    return single


def write_chosen(chosen: Candidate, out: str, model_path: Path | None) -> dict[str, Any]:
    assert chosen.path is not None
    destination = parse_out(out, model_path)
    sha256 = file_sha256(chosen.path)
    written: dict[str, Any] = {"candidate": chosen.name, "sha256": sha256, "size_bytes": chosen.path.stat().st_size}
    if destination.is_gcs:
        generation = upload(chosen.path, destination)
        uri = f"gs://{destination.bucket}/{destination.name}#{generation}"
        written |= {"out": destination.given, "uri": uri, "generation": generation,
                    "release_command": f"invoke release --target cloudrun --model {uri} --sha256 {sha256}"}  # fmt: skip
    else:
        assert destination.path is not None
        write_local(chosen.path, destination.path)
        written |= {"out": str(destination.path), "uri": str(destination.path), "generation": None,
                    "upload_command": f"gcloud storage cp {destination.path} gs://BUCKET/{destination.path.name}",
                    "release_command": f"invoke release --target cloudrun --model gs://BUCKET/{destination.path.name} "
                                       f"--sha256 {sha256}"}  # fmt: skip
    return written


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def build_document(original: LoadedModel, original_batching: dict, job: Job, bodies: list[dict] | None, samples: str,
                   thresholds: Thresholds, judged: list[Candidate], chosen: Candidate | None,
                   written: dict | None) -> dict[str, Any]:  # fmt: skip
    rows = []
    for candidate in judged:
        row: dict[str, Any] = {"candidate": candidate.name, "how": candidate.how, "verdict": candidate.verdict()}
        if candidate.report is None:
            row["not_made"] = candidate.not_made
        else:
            report = candidate.report.document
            assert candidate.path is not None
            row |= {
                "size_bytes": candidate.path.stat().st_size,
                "sha256": report["models"]["candidate"]["sha256"],
                "signature": {k: report["signature"][k] for k in ("breaking", "compatible")},
                "outputs": report["outputs"],
                "latency": report["latency"],
                "batching": candidate.batching,
                "served_rows_per_second_ratio": candidate.served_ratio,
                "failures": candidate.report.failures,
            }
        rows.append(row)
    runs = [c.report.document for c in judged if c.report]
    first = runs[0] if runs else None
    requests = first["requests"]["source"] if first else (
        f"{len(bodies)} request(s) from {samples}" if bodies else "seeded requests")
    return {
        "model": original.describe() | {"operators": sorted(job.ops)},
        "original": {"batching": original_batching,
                     "latency": _original_latency([run["latency"] for run in runs]) if runs else None},  # fmt: skip
        "requests": requests,
        "calibration": job.calibration_source,
        "intra_op_threads": original.store.settings.intra_op_threads,
        "thresholds": thresholds.as_json(),
        "candidates": rows,
        "chosen": written,
        "verdict": "pass" if written else "fail",
    }


def _original_latency(latencies: list[dict[str, Any]]) -> dict[str, Any]:
    """The original's figures: the median of its runs beside each candidate (whose ratios are from its own run)."""
    import numpy as np

    figures: dict[str, Any] = {}
    for label in ("single_row", "batch"):
        runs = [latency[label]["baseline"] for latency in latencies if "baseline" in latency.get(label, {})]
        figures[label] = {key: float(np.median([run[key] for run in runs])) for key in runs[0]} if runs else None
    return figures


# ---------------------------------------------------------------------------------------------------------------
# The report.


def render_text(document: dict[str, Any]) -> str:
    model = document["model"]
    lines = [f"model      {model['uri']}  sha256 {(model['sha256'] or '')[:12]}  {_size(model['size_bytes'])}  "
             f"operators {', '.join(model['operators'])}",
             f"judged on  {document['requests']}, {document['intra_op_threads']} intra-op thread(s) as the service "
             "would use here; ratios against the original in the same run",
             f"calibrated on {document['calibration']} (int8-static)", ""]  # fmt: skip
    header = (f"  {'candidate':<13} {'size':>9} {'rows/s @64':>18} {'p50 1-row':>18} {'p99 1-row':>18} "
              f"{'served':>7} {'batching':>8} {'max abs diff':>12} {'agreement':>9}  verdict")  # fmt: skip
    lines.append(header)
    original = document["original"]
    if original["latency"]:
        batch, single = original["latency"]["batch"], original["latency"]["single_row"]
        lines.append(f"  {'original':<13} {_size(model['size_bytes']):>9} "
                     f"{_cell(batch, 'rows_per_second', '{:,.0f}'):>18} {_cell(single, 'p50_ms', '{:.3f} ms'):>18} "
                     f"{_cell(single, 'p99_ms', '{:.3f} ms'):>18} {'1.00x':>7} "
                     f"{'on' if original['batching']['enabled'] else 'off':>8} {'-':>12} {'-':>9}  (the baseline)")  # fmt: skip
    notes = []
    for row in document["candidates"]:
        if row["verdict"] == "not made":
            lines.append(f"  {row['candidate']:<13} {'-':>9} {'':>18} {'':>18} {'':>18} {'':>7} {'':>8} {'':>12} "
                         f"{'':>9}  {row['not_made']}")  # fmt: skip
            continue
        latency = row["latency"]
        batch, single = latency["batch"], latency["single_row"]
        drift, agreement = _drift(row["outputs"])
        ratio = row["served_rows_per_second_ratio"]
        verdict = "pass" if row["verdict"] == "pass" else "FAIL: " + ", ".join(_gate_names(row["failures"]))
        if document["chosen"] and document["chosen"]["candidate"] == row["candidate"]:
            verdict += " (chosen)"
        lines.append(
            f"  {row['candidate']:<13} {_size(row['size_bytes']):>9} "
            f"{_with_ratio(batch, 'rows_per_second', 'rows_per_second_ratio', '{:,.0f}'):>18} "
            f"{_with_ratio(single, 'p50_ms', 'p50_ratio', '{:.3f}'):>18} "
            f"{_with_ratio(single, 'p99_ms', 'p99_ratio', '{:.3f}'):>18} "
            f"{(f'{ratio:.2f}x' if ratio else '-'):>7} {'on' if row['batching']['enabled'] else 'off':>8} "
            f"{drift:>12} {agreement:>9}  {verdict}"
        )  # fmt: skip
        notes += [f"  {row['candidate']}: {failure}" for failure in row["failures"]]
        if not row["batching"]["enabled"] and original["batching"]["enabled"]:
            notes.append(f"  {row['candidate']}: the service would not batch it ({row['batching']['reason']}); "
                         "its 'served' figure is at single-row rate")  # fmt: skip
    lines += ["", "  rows/s @64: 64-row batches; p50/p99: single-row run time (ratio to the original in brackets); "
                  "served: rows/s as the service would run it (batches when its batching self-test passes)"]  # fmt: skip
    thresholds = document["thresholds"]
    gates = [f"{k} {v:g}" for k, v in thresholds.items() if v is not None]
    lines += ["", "Gates: " + (", ".join(gates) if gates else "none given (drift is reported, not judged)")]
    if notes:
        lines += ["", "Notes:", *notes]
    chosen = document["chosen"]
    lines.append("")
    if chosen is None:
        lines.append("FAIL: no candidate holds every gate; nothing written")
        return "\n".join(lines)
    lines.append(f"PASS: {chosen['candidate']} written to {chosen['uri']}")
    lines.append(f"  sha256 {chosen['sha256']}  {_size(chosen['size_bytes'])}")
    best = next(r for r in document["candidates"] if r["candidate"] == chosen["candidate"])
    if (best["served_rows_per_second_ratio"] or 0) <= 1:
        lines.append("  note: it is not faster than the original in this run; the original may serve as well")
    if chosen.get("upload_command"):
        lines += ["", "Upload it, then release it:", f"  {chosen['upload_command']}", f"  {chosen['release_command']}"]
    else:
        lines += ["", "Release it (or --target fly):", f"  {chosen['release_command']}"]
    return "\n".join(lines)


def _gate_names(failures: list[str]) -> list[str]:
    names = []
    for failure in failures:
        match = re.search(r"\((max_abs_diff|min_agreement|max_latency_ratio)\)|(breaking signature)|(refused)", failure)
        name = (match.group(1) or ("signature" if match.group(2) else "refused requests")) if match else failure[:40]
        if name not in names:
            names.append(name)
    return names


def _drift(outputs: dict[str, dict]) -> tuple[str, str]:
    diffs = [f["max_abs_diff"] for f in outputs.values() if "max_abs_diff" in f]
    agreements = [f[k] for f in outputs.values() for k in ("argmax_agreement", "agreement") if k in f]
    diff = "inf" if "inf" in diffs else (f"{max(diffs):.3g}" if diffs else "-")
    return diff, (f"{min(agreements):.2%}" if agreements else "-")


def _cell(figures: dict | None, key: str, form: str) -> str:
    return form.format(figures[key]) if figures and key in figures else "-"


def _with_ratio(figures: dict, key: str, ratio: str, form: str) -> str:
    if "skipped" in figures:
        return "not measured"
    return f"{form.format(figures['candidate'][key])} ({figures[ratio]:.2f}x)"


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


@task(
    help={
        "model": "the model to make cheaper: gs://BUCKET/PATH/model.onnx[#GENERATION] or a local path "
                 "(default: model.uri, with model.sha256)",
        "samples": "JSONL file of /predict bodies to judge drift on (default: the seeded requests model.compare "
                   "makes)",
        "calibration": "JSONL file of /predict bodies to calibrate int8-static on (default: the samples)",
        "max_abs_diff": "a candidate fails when any numeric output differs by more than this "
                        "(default: release.max_abs_diff)",
        "min_agreement": "a candidate fails when an output's arg-max or exact agreement is under this fraction "
                         "(default: release.min_agreement)",
        "max_latency_ratio": "a candidate fails when its single-row p50 or p99 is over this many times the "
                             "original's (default: release.max_latency_ratio)",
        "out": "where the chosen model goes: a local path or gs://BUCKET/PATH.onnx (default: optimize.out, else "
               "beside the model as NAME.CANDIDATE.onnx)",
        "candidates": f"comma-separated candidates to try, of {', '.join(CANDIDATES)} (default: optimize.candidates)",
        "speed_seconds": "seconds to time each of single-row and 64-row runs per candidate "
                         "(default: optimize.speed_seconds)",
        "json": "print one JSON document (each candidate's figures and verdict, the chosen file and its sha256)",
    }
)
def optimize(
    c, model="", samples="", calibration="", max_abs_diff=None, min_agreement=None, max_latency_ratio=None, out="",
    candidates="", speed_seconds=None, json=False,
):  # fmt: skip
    """Make cheaper versions of a model, judge each as model.compare does, and write the fastest that passes."""
    try:
        thresholds = compare.thresholds_from_flags(c, max_abs_diff, min_agreement, max_latency_ratio)
        seconds = compare.parse_threshold("--speed-seconds", speed_seconds)
        seconds = seconds or compare.parse_threshold("optimize.speed_seconds", c.optimize.speed_seconds)
        sha256 = "" if model else str(c.model.sha256 or "")
        model = model or str(c.model.uri)
        if not json:
            print(f"optimizing {model}: making and judging candidates ...", flush=True)
        report = optimize_model(
            model, model_sha256=sha256, samples=samples, calibration=calibration,
            thresholds=thresholds, out=out or str(c.optimize.out or ""),
            candidates=parse_candidates(candidates or c.optimize.candidates),
            speed_seconds=seconds or compare.SPEED_SECONDS,
        )  # fmt: skip
    except CompareError as exc:
        if json:
            print(_json({"verdict": "error", "failures": [str(exc)]}))
        raise Exit(f"model.optimize: {exc}", code=2) from None
    print(_json(report.document) if json else report.text())
    if not report.ok:
        raise Exit(code=1)


def _json(document: dict) -> str:
    return json.dumps(document, indent=2)
