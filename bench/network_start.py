"""Cold start at the network's speed (issue 17): a large model fetched through a stand-in that caps each connection
as one Cloud Storage stream is capped (tests/support/storage_throttle.py, in front of the emulator), as one file
and as a model with external data. For each: the service's time to ready and its steps (download, verify, session,
warm-up, from /health's load_steps); the same service reading one stream per file; and the floor, a bare process
that imports the client and onnxruntime, downloads every file with 8 concurrent ranged reads through the same
stand-in (the client's transfer manager, as `gcloud storage cp` slices) and opens the session
(bench/floor_start.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bench import CACHE, coldstart, large_request, servers
from bench.report import Figure, markdown_table
from tests.support.models import ROOT, embedding_model, large_model
from tests.support.processes import stop
from tests.support.storage_emulator import storage_emulator

BUCKET = "network"
RATE_MB = 16.0  # per connection: one Cloud Storage stream to a Cloud Run instance gives tens of MB/s
FIRST_BYTE_MS = 50.0
FLOOR_READERS = 8
TARGET = "<= 1.2"


@dataclass(frozen=True)
class NetworkModel:
    key: str
    label: str
    folder: Path  # the model and its data files; uploaded under gs://BUCKET/<key>/
    body: bytes

    @property
    def uri(self) -> str:
        return f"gs://{BUCKET}/{self.key}/model.onnx"

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def network_models(work: Path, megabytes: int, progress) -> list[NetworkModel]:
    """One file of `megabytes` MB, and an embedding table of `megabytes` MB as external data; made once."""
    single = work / "models" / f"single-{megabytes}mb"
    if not (single / "model.onnx").is_file():
        progress(f"making a {megabytes} MB single-file model under {single}")
        single.mkdir(parents=True, exist_ok=True)
        large_model(single / "model.onnx", megabytes)
    external = work / "models" / f"embedding-{megabytes}mb"  # shared with bench/external_memory.py
    if not (external / "model.onnx").is_file():
        progress(f"making a {megabytes} MB external-data model under {external}")
        embedding_model(external, megabytes)
    return [
        NetworkModel(f"{megabytes}mb", f"{megabytes} MB, one file", single, large_request.rows_body("features", 1, 64)),
        NetworkModel(f"{megabytes}mb_external", f"{megabytes} MB, model + external data", external,
                     b'{"inputs": {"ids": [[1], [7]]}}'),
    ]  # fmt: skip


@contextlib.contextmanager
def throttled(emulator_port: int, log_path: Path, rate_mb: float, delay_ms: float) -> Iterator[str]:
    """The stand-in as a process of its own (it then paces on a core of its own); yields its STORAGE_EMULATOR_HOST."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.storage_throttle", "--upstream", f"http://127.0.0.1:{emulator_port}",
             "--rate-mb", str(rate_mb), "--delay-ms", str(delay_ms)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        line = process.stdout.readline().decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the storage stand-in did not start; see {log_path}")
        yield f"http://127.0.0.1:{line.split()[-1]}"
    finally:
        stop(process)
        process.stdout.close()


def upload(host: str, model: NetworkModel) -> None:
    """Every file of the model through the stand-in (so each object's mediaLink names it), then one ranged read of
    each, so the stand-in holds the bytes before anything is timed."""

    from google.cloud import storage

    os.environ["STORAGE_EMULATOR_HOST"] = host
    client = storage.Client(project="bench")
    bucket = client.bucket(BUCKET)
    if not bucket.exists():
        bucket = client.create_bucket(BUCKET)
    for file in model.files:
        blob = bucket.blob(f"{model.key}/{file.name}")
        blob.upload_from_filename(str(file), timeout=600)
        bucket.blob(blob.name).download_as_bytes(start=0, end=0)


def figures(work: Path, logs: Path, megabytes: int, reps: int, progress) -> tuple[list[Figure], str]:
    """The figures, and the table of time to ready and its steps."""
    models = network_models(work, megabytes, progress)
    progress(
        f"cold start through the stand-in: {RATE_MB:g} MB/s per connection, {FIRST_BYTE_MS:g} ms to the first byte; "
        f"{reps} runs of each model: the service, the service with one stream per file, the floor"
    )
    results: dict[str, dict[str, list]] = {}
    with storage_emulator(log_path=logs / "network-emulator.log") as emulator, \
            throttled(emulator.port, logs / "network-throttle.log", RATE_MB, FIRST_BYTE_MS) as host:  # fmt: skip
        storage = {"STORAGE_EMULATOR_HOST": host}
        for model in models:
            upload(host, model)
            runs = results[model.key] = {"service": [], "single": [], "floor": []}
            for rep in range(reps):
                order = ("floor", "service", "single") if rep % 2 == 0 else ("single", "service", "floor")
                for kind in order:
                    if kind == "floor":
                        runs["floor"].append(floor(model, storage, logs))
                    else:
                        extra = {"MODEL_DOWNLOAD_CONCURRENCY": "1"} if kind == "single" else {}
                        runs[kind].append(coldstart.service_start(model.uri, {**storage, **extra}, logs, model.body, 1))
                service, single = runs["service"][-1], runs["single"][-1]
                progress(
                    f"  {model.label} run {rep + 1}/{reps}: service ready {service.ready:.2f} s "
                    f"({steps(service.steps)}), one stream {single.ready:.2f} s, floor {runs['floor'][-1]:.2f} s"
                )
    out, rows = [], [("model", "service: time to ready", "download", "verify", "session", "warm-up", "first /health",
                      "one stream per file", f"floor ({FLOOR_READERS} ranged reads)", "service / floor",
                      f"target {TARGET}")]  # fmt: skip
    for model in models:
        runs = results[model.key]
        ready = statistics.median(s.ready for s in runs["service"])
        single = statistics.median(s.ready for s in runs["single"])
        floor_seconds = statistics.median(runs["floor"])
        median_steps = {
            step: statistics.median(s.steps.get(step, 0.0) for s in runs["service"])
            for step in ("download", "verify", "session", "warm_up")
        }
        first = statistics.median(s.first_answer for s in runs["service"])
        label = f"{model.label} at {RATE_MB:g} MB/s per connection"
        out.append(Figure(
            f"network_ready_{model.key}", f"time to ready, {label}", "s", ready, floor_seconds, FLOOR_LABEL, TARGET,
            note=steps(median_steps),
        ))  # fmt: skip
        out.append(Figure(
            f"network_ready_{model.key}_one_stream", f"time to ready, {label}, one stream per file", "s", single,
            floor_seconds, FLOOR_LABEL,
        ))  # fmt: skip
        rows.append((
            model.label, f"{ready:.2f} s", *(f"{median_steps[s]:.2f} s" for s in median_steps), f"{first:.2f} s",
            f"{single:.2f} s", f"{floor_seconds:.2f} s", f"{ready / floor_seconds:.2f}x",
            "yes" if ready / floor_seconds <= 1.2 else "NO",
        ))  # fmt: skip
    note = (
        f"Medians of {reps} runs per model, each through the stand-in at {RATE_MB:g} MB/s per connection and "
        f"{FIRST_BYTE_MS:g} ms to the first byte, with an empty model cache. The steps are the service's own "
        "(/health load_steps): the download includes the sha256 and crc32c, computed as the bytes arrive."
    )
    return out, markdown_table(rows) + "\n\n" + note


FLOOR_LABEL = (
    "time to ready through the stand-in: a bare Python process that imports google-cloud-storage and onnxruntime, "
    f"downloads every file with {FLOOR_READERS} concurrent ranged reads (transfer_manager, threads) and opens the "
    "session (bench/floor_start.py)"
)


def floor(model: NetworkModel, storage: dict[str, str], logs: Path) -> float:

    directory = Path(tempfile.mkdtemp(prefix="floor-", dir=logs))
    try:
        return servers.floor_start_seconds(model.uri, directory, {**os.environ, **storage}, readers=FLOOR_READERS)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def steps(seconds: dict[str, float]) -> str:
    return ", ".join(f"{step} {value:.2f} s" for step, value in seconds.items())


def main() -> None:
    """`python -m bench.network_start [--megabytes 1024] [--reps 3]`: this table alone, without the rest of the bench."""
    import argparse

    from bench.report import table

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--megabytes", type=int, default=1024, help="size of each model")
    parser.add_argument("--reps", type=int, default=3, help="runs of each model, each way")
    args = parser.parse_args()
    work = CACHE
    logs = work / "network-run"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    load = os.getloadavg()
    out, text = figures(work, logs, args.megabytes, args.reps, print)
    print("\n" + table(out) + "\n\n" + text)
    print(f"\nLoad average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min).")


if __name__ == "__main__":
    main()
