"""Memory of a model whose weights are external data (model.onnx + model.onnx.data): onnxruntime maps the data file
from the cache instead of copying it, so the worker's peak RSS is the empty service plus the file's pages."""

from __future__ import annotations

from pathlib import Path

from bench import coldstart, large_request
from bench.report import Figure
from tests.support.models import DEMO_MODEL, embedding_model


def figures(work: Path, logs: Path, megabytes: int, requests: int, progress) -> list[Figure]:
    folder = work / "models" / f"embedding-{megabytes}mb"
    model = folder / "model.onnx"
    if not model.is_file():
        progress(f"making a {megabytes} MB external-data model under {folder}")
        embedding_model(folder, megabytes)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    empty = coldstart.service_start(str(DEMO_MODEL), {}, logs, large_request.rows_body("features", 1, 4), requests)
    ours = coldstart.service_start(str(model), {}, logs, b'{"inputs": {"ids": [[1], [7]]}}', requests)
    progress(
        f"external data, {megabytes} MB: worker peak RSS {ours.peak_rss / 2**20:.0f} MB, empty service "
        f"{empty.peak_rss / 2**20:.0f} MB, files {size / 2**20:.0f} MB, ready in {ours.ready:.2f} s"
    )
    return [Figure(
        "peak_rss_external", f"worker peak RSS, {megabytes} MB external-data model", "MB", ours.peak_rss,
        empty.peak_rss,
        "peak RSS, external data: the empty service's (demo model); the model is an embedding table whose lookups "
        "read a few rows, so mapped weights cost only the pages read, where a copy would add all of them", "<= 1.5",
        note=f"VmHWM after loading from a local path and {requests} lookups; files {size / 2**20:.0f} MB; "
        f"time to ready {ours.ready:.2f} s",
    )]  # fmt: skip
