"""Benchmarks of the inference service, each figure beside a floor measured in the same run: `invoke bench`.

Absolute times on a shared 2-core machine drift, so every figure is paired with the least the same work costs
(a bare process, a bare ASGI app, an in-process call) and the target is the ratio. See docs/benchmarks.md.
"""

import os
from pathlib import Path

# Where the bench keeps what it makes once (models, the peers' virtual environments) and its run logs: .cache/bench
# in the project, or $ONNX_SERVE_BENCH_CACHE (the tests point it outside the checkout).
CACHE = Path(os.environ.get("ONNX_SERVE_BENCH_CACHE") or Path(__file__).resolve().parent.parent / ".cache" / "bench")
