"""What `invoke model.optimize` gains on a MatMul-heavy model (an MLP) and a small convolutional one:
`python -m bench.optimize [--seconds S]`. Prints the task's own table for each (docs/optimizing.md quotes them).

Each candidate's speed is measured against the original in alternating runs of one process (toolkit/compare.py), so
the ratios hold on a shared machine better than the absolute rows/s; run it twice and keep what both runs agree on.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from tests.support.models import cnn_model, mlp_model
from toolkit.optimize import optimize_model

MODELS = {
    "MLP 256-1024-1024-16 (MatMul-heavy, 5.3 MB)": lambda folder: mlp_model(folder / "mlp.onnx"),
    "CNN 3x64x64, Conv 32 and 64 channels (small convolutional)":
        lambda folder: cnn_model(folder / "cnn.onnx", size=64, channels=(32, 64)),  # fmt: skip
}


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(flag for flag in flags.split() if flag in wanted)


def main(seconds: float) -> None:
    print(f"CPU flags: {cpu_flags()}; {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as folder:
        for title, make in MODELS.items():
            model = make(Path(folder))
            report = optimize_model(str(model), out=str(Path(folder) / f"chosen-{model.name}"), speed_seconds=seconds)
            print(f"\n## {title}\n{report.text()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each timing, per candidate")
    main(parser.parse_args().seconds)
