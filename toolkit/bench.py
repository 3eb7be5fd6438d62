"""`invoke bench`: measure cold start, throughput, latency, memory and image size, each against its floor, and
throughput side by side with a seed-style FastAPI app and LitServe."""

from __future__ import annotations

from pathlib import Path

from invoke import Exit, task

ROOT = Path(__file__).resolve().parent.parent


@task(
    help={
        "quick": "one short run of everything (about 1.5 minutes), for CI and for trying changes; the figures are rougher",
        "out": "where to write the figures as JSON (default: bench/results/latest.json)",
    }
)
def bench(c, quick=False, out=""):
    """Benchmark the service against its floors and its peers, print the tables and write the figures as JSON."""
    if not (ROOT / "models" / "demo.onnx").is_file():
        raise Exit("models/demo.onnx is missing: run `python scripts/make_demo_model.py`.")
    try:
        from bench import run
    except ImportError as exc:
        raise Exit(f"cannot import the benchmarks ({exc}): install the dev requirements (pip install -r "
                   "requirements-dev.txt).") from None
    run.run(quick, Path(out) if out else run.RESULTS)
