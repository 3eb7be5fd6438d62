"""Virtual environments for the peers the service is compared with, made by the bench and cached under
.cache/bench/venvs (bench.CACHE), so that no peer's packages ever land in the service's environment or pins.

Each is made with the Python that runs the bench and rebuilt when its pins (or that Python) change. The packages
a peer shares with the service (onnxruntime, numpy, and uvicorn with its loop and parser) take the service's own
pins from requirements.txt: a ratio then measures the servers' code, not different versions underneath.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import CACHE
from tests.support.models import ROOT

VENVS = CACHE / "venvs"
LITSERVE = "litserve==0.2.19"
SHARED_WITH_SERVICE = ("onnxruntime", "numpy", "uvicorn", "uvloop", "httptools")
_MARKER = "bench-pins.txt"


def service_pins(names: tuple[str, ...], requirements: Path = ROOT / "requirements.txt") -> list[str]:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", requirements.read_text(), re.MULTILINE))
    missing = [name for name in names if name not in pins]
    if missing:
        raise RuntimeError(f"{requirements} pins no version of {', '.join(missing)}")
    return [f"{name}=={pins[name]}" for name in names]


def litserve_python(progress) -> Path:
    """The python of LitServe's environment, made (or remade) first if its pins changed."""
    return ensure("litserve", [LITSERVE, *service_pins(SHARED_WITH_SERVICE)], progress)


def ensure(name: str, pins: list[str], progress) -> Path:
    directory = VENVS / name
    python = directory / "bin" / "python"
    wanted = "\n".join([f"python {sys.version.split()[0]} ({sys.base_prefix})", *pins]) + "\n"
    marker = directory / _MARKER
    if python.is_file() and marker.is_file() and marker.read_text() == wanted:
        return python
    started = time.perf_counter()
    shutil.rmtree(directory, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-input", *pins], capture_output=True, text=True
    )
    if installed.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"pip install {' '.join(pins)} into {directory} failed:\n{installed.stderr[-3000:]}")
    marker.write_text(wanted)
    progress(f"{name}: made its virtual environment {directory} in "
             f"{time.perf_counter() - started:.0f} s ({', '.join(pins)})")  # fmt: skip
    return python
