"""Supply-chain figures on this machine's Docker engine (or a private dockerd) and the stand-in base image:
what `pip install --require-hashes` costs the image build (the builder stage built with --no-cache, with and
without hashes, alternating), one image's OCI labels and the head of its SBOM. Slow (several full installs):
run by hand, `python -m bench.supply_chain [ROUNDS]`; figures go to bench/results/supply_chain.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.base_image import build_base_image
from tests.support.docker_engine import DockerEngine, docker_engine
from tests.support.models import ROOT

RESULTS = ROOT / "bench" / "results" / "supply_chain.json"
HASH_LINE = re.compile(r" \\\n    --hash=sha256:[0-9a-f]{64}")


def without_hashes(context: Path) -> None:
    """The same pins, no hashes, no --require-hashes: the build as it was before the lock carried hashes."""
    lock = context / "requirements.txt"
    lock.write_text(HASH_LINE.sub("", lock.read_text()))
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(" --require-hashes", ""))


def builder_seconds(engine: DockerEngine, base: str, context: Path) -> float:
    started = time.monotonic()
    engine.docker("build", "--no-cache", "--quiet", "--platform", "linux/amd64", "--network", "host", "--target",
                  "builder", "--build-arg", f"BASE_IMAGE={base}", "--tag", "onnx-serve-bench:builder", str(context))
    return time.monotonic() - started


def main(rounds: int = 2) -> dict:
    figures: dict = {}
    with docker_engine() as engine, tempfile.TemporaryDirectory(prefix="onnx-serve-bench-") as tmp:
        base = build_base_image(engine).name
        contexts = {}
        for kind in ("hashes", "no_hashes"):
            context = Path(tmp) / kind
            context.mkdir()
            for name in ("Dockerfile", ".dockerignore", "requirements.txt"):
                shutil.copy2(ROOT / name, context / name)
            if kind == "no_hashes":
                without_hashes(context)
            contexts[kind] = context
        times: dict[str, list[float]] = {"hashes": [], "no_hashes": []}
        for round_ in range(rounds):  # alternating, and the order flips each round
            for kind in ("no_hashes", "hashes") if round_ % 2 == 0 else ("hashes", "no_hashes"):
                times[kind].append(round(builder_seconds(engine, base, contexts[kind]), 1))
        figures["builder_no_cache_seconds"] = times
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}, "DOCKER_HOST": engine.host,
               "INVOKE_IMAGE_BUILD_NETWORK": "host"}
        built = subprocess.run([sys.executable, "-m", "invoke", "image.build", "--tag", "bench", "--base-image", base],
                               cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        figures["build_output"] = built.stdout.strip().splitlines()[-3:]
        figures["labels"] = json.loads(engine.docker("image", "inspect", "--format", "{{json .Config.Labels}}",
                                                     "onnx-serve:bench").stdout)
        sbom = ROOT / "build" / "sbom" / "onnx-serve_bench.cdx.json"
        figures["sbom_head"] = sbom.read_text().splitlines()[:40]
        engine.docker("rmi", "onnx-serve:bench", "onnx-serve-bench:builder", check=False)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2), indent=2))
