"""Instance shapes the platforms offer, and the settings a measured concurrency sweep leads to on each.

Pure functions over figures: no Docker, no HTTP (those are in tune.py), so the rules are unit-tested directly.

Platform rules used here, with their sources (read 2026-12-06):
- Cloud Run CPU 1, 2, 4, 6 or 8 (below 1 vCPU forces concurrency 1 and gen1, which the deploy does not use); memory
  512 MiB (gen2) up to 4 GiB for 1 vCPU, 8 for 2, 2-16 for 4, 4-24 for 6, 4-32 for 8 (cloud.google.com/run/docs/
  configuring/services/cpu and .../memory-limits).
- Cloud Run adds instances to keep concurrency near 60% of the configured maximum and CPU near 60%
  (cloud.google.com/run/docs/about-instance-autoscaling).
- Fly sizes and their memory range (superfly/docs snippets/RegionPricingSelector.jsx), memory in 256 MB steps
  (Machines API MachineGuest.memory_mb); the proxy prefers Machines under `soft_limit`, starts stopped ones when all
  are past it, and refuses past `hard_limit` (fly.io/docs/reference/configuration, http_service.concurrency).
- Fly CPU quota: each 80 ms period, 5 ms per shared vCPU (6.25%) or the whole period per performance vCPU; shared
  Machines burst to 100% on a balance (5 s at start, up to 500 s) and run at the baseline once it is spent
  (superfly/docs machines/cpu-performance.mdx = https://fly.io/docs/machines/cpu-performance/).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from invoke import Exit

MIB = 1024 * 1024
GIB = 1024 * MIB
CLOUDRUN_MEMORY = {1: (512 * MIB, 4 * GIB), 2: (512 * MIB, 8 * GIB), 4: (2 * GIB, 16 * GIB),
                   6: (4 * GIB, 24 * GIB), 8: (4 * GIB, 32 * GIB)}  # fmt: skip
SCALE_TARGET = 0.6  # Cloud Run's autoscaler: 60% of maximum concurrency, 60% CPU
FLY_PERIOD_US = 80_000
FLY_SHARED_QUOTA_US = 5_000  # per shared vCPU and 80 ms period: the baseline
FLY_BURST = "shared vCPUs burst to 100% on a balance (5 s at start, up to 500 s banked when idle) and run at the " \
            "6.25%-per-vCPU baseline once it is spent; sustained figures here are at the baseline"
# name: (vCPUs, kind, least memory MB, most memory MB)
FLY_SIZES = {
    "shared-cpu-1x": (1, "shared", 256, 2048), "shared-cpu-2x": (2, "shared", 512, 4096),
    "shared-cpu-4x": (4, "shared", 1024, 8192), "shared-cpu-6x": (6, "shared", 1536, 12288),
    "shared-cpu-8x": (8, "shared", 2048, 16384),
    "performance-1x": (1, "performance", 2048, 8192), "performance-2x": (2, "performance", 4096, 16384),
    "performance-4x": (4, "performance", 8192, 32768), "performance-6x": (6, "performance", 12288, 49152),
    "performance-8x": (8, "performance", 16384, 65536), "performance-10x": (10, "performance", 20480, 81920),
    "performance-12x": (12, "performance", 24576, 98304), "performance-14x": (14, "performance", 28672, 114688),
    "performance-16x": (16, "performance", 32768, 131072),
}  # fmt: skip
HEADROOM = 1.25  # memory above the measured peak: other inputs, arena growth, the platform's own use
HEADROOM_BYTES = 128 * MIB
TIE = 0.03  # steps within 3% of the best rate are as good: the lower concurrency (less queueing) wins
KNEE = 0.9  # Fly's soft_limit: the least concurrency reaching 90% of the best rate; past it requests only queue


@dataclass(frozen=True)
class Shape:
    """One instance shape as the platform names it, and how to reproduce its CPU with Docker."""

    target: str  # cloudrun | fly
    name: str  # as given: "2:4Gi", "shared-cpu-2x:2gb"
    vcpus: int  # CPUs the instance has (threads it should run)
    memory_bytes: int
    cpu_kind: str = "dedicated"  # fly: shared | performance
    size: str = ""  # fly VM size

    @property
    def cpu_period_us(self) -> int:
        return FLY_PERIOD_US if self.target == "fly" else 100_000

    @property
    def quota_cpus(self) -> float:
        """CPUs of quota a sustained load gets: all of them, or Fly's shared baseline."""
        if self.cpu_kind == "shared":
            return self.vcpus * FLY_SHARED_QUOTA_US / FLY_PERIOD_US
        return float(self.vcpus)

    @property
    def memory_text(self) -> str:
        return self.name.split(":", 1)[1]

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"name": self.name, "cpu": self.vcpus, "memory": self.memory_text,
                                    "memory_bytes": self.memory_bytes, "quota_cpus": self.quota_cpus}  # fmt: skip
        if self.target == "fly":
            document.update(size=self.size, cpu_kind=self.cpu_kind)
            if self.cpu_kind == "shared":
                document["burst"] = FLY_BURST
        return document


def parse_memory(text: str, where: str) -> int:
    """Bytes of "512Mi", "2Gi" (Cloud Run) or "2gb", "512mb", 2048 (Fly, MB): binary units, as both platforms bill."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(mi|gi|mb|gb|m|g)?\s*", str(text).lower())
    if not match:
        raise Exit(f"{where}: memory {text!r} is not a size; write it as 512Mi or 2Gi (Cloud Run), 512mb or 2gb (Fly)")
    number, unit = float(match[1]), match[2] or "mb"
    return int(number * (GIB if unit in {"gi", "gb", "g"} else MIB))


def parse_shapes(target: str, text: str) -> list[Shape]:
    """`1:2Gi,2:4Gi` (Cloud Run CPU:MEMORY) or `shared-cpu-2x:2gb,performance-1x` (Fly SIZE[:MEMORY]); Exit naming
    what the platform offers instead when a shape is not one of its shapes."""
    shapes = []
    for item in [part.strip() for part in str(text).split(",") if part.strip()]:
        shapes.append(_cloudrun_shape(item) if target == "cloudrun" else _fly_shape(item))
    if not shapes:
        raise Exit("--shapes is empty: give e.g. 1:2Gi,2:4Gi for Cloud Run or shared-cpu-2x:2gb for Fly")
    return shapes


def _cloudrun_shape(item: str) -> Shape:
    cpu_text, _, memory_text = item.partition(":")
    if not memory_text:
        raise Exit(f"Cloud Run shape {item!r}: write CPU:MEMORY, e.g. 2:4Gi")
    try:
        cpu = float(cpu_text)
    except ValueError:
        raise Exit(f"Cloud Run shape {item!r}: CPU {cpu_text!r} is not a number; use 1, 2, 4, 6 or 8") from None
    if cpu not in CLOUDRUN_MEMORY:
        raise Exit(f"Cloud Run shape {item!r}: Cloud Run offers 1, 2, 4, 6 or 8 vCPU for a service that takes "
                   "concurrent requests (below 1 vCPU it allows concurrency 1 only, on gen1)")
    memory = parse_memory(memory_text, f"Cloud Run shape {item!r}")
    least, most = CLOUDRUN_MEMORY[int(cpu)]
    if not least <= memory <= most:
        raise Exit(f"Cloud Run shape {item!r}: with {int(cpu)} vCPU Cloud Run allows {least // MIB}Mi to "
                   f"{most // GIB}Gi of memory; pick a memory in that range or another CPU count")
    return Shape("cloudrun", item, int(cpu), memory)


def _fly_shape(item: str) -> Shape:
    size, _, memory_text = item.partition(":")
    if size not in FLY_SIZES:
        raise Exit(f"Fly shape {item!r}: {size!r} is not a Fly VM size; use one of {', '.join(FLY_SIZES)}")
    vcpus, kind, least, most = FLY_SIZES[size]
    memory = parse_memory(memory_text, f"Fly shape {item!r}") if memory_text else least * MIB
    if not least * MIB <= memory <= most * MIB or memory % (256 * MIB):
        raise Exit(f"Fly shape {item!r}: {size} takes {least}mb to {most}mb of memory in steps of 256mb")
    name = item if memory_text else f"{size}:{fly_memory_text(memory)}"
    return Shape("fly", name, vcpus, memory, kind, size)


def fly_memory_text(memory: int) -> str:
    return f"{memory // GIB}gb" if memory % GIB == 0 else f"{memory // MIB}mb"


def cloudrun_memory_text(memory: int) -> str:
    return f"{memory // GIB}Gi" if memory % GIB == 0 else f"{memory // MIB}Mi"


# ---------------------------------------------------------------------------------------------------------------
# From a sweep to settings


@dataclass
class Step:
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_util: float | None  # share of the shape's CPU quota the container used, 0..1
    peak_rss_bytes: int | None  # the container's largest working set so far
    lower_bound: bool = False  # the load generator saturated its CPU: the service may do more
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "rps": round(self.rps, 1), "p50_ms": round(self.p50_ms, 2),
                "p99_ms": round(self.p99_ms, 2), "errors": self.errors,
                "cpu_util": None if self.cpu_util is None else round(self.cpu_util, 3),
                "peak_rss_bytes": self.peak_rss_bytes, "lower_bound": self.lower_bound,
                **({"notes": self.notes} if self.notes else {})}  # fmt: skip


def meets(step: Step, p99_ms: float) -> bool:
    return step.errors == 0 and step.p99_ms <= p99_ms and step.rps > 0


def best_step(steps: list[Step], p99_ms: float) -> Step | None:
    """The step with the most rps within the objective (no errors); among those within TIE of it, the lowest
    concurrency."""
    ok = [s for s in steps if meets(s, p99_ms)]
    if not ok:
        return None
    top = max(s.rps for s in ok)
    return min((s for s in ok if s.rps >= top * (1 - TIE)), key=lambda s: s.concurrency)


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at x on the broken line through points (sorted by x, starting at the origin); flat past the last."""
    points = [(0.0, 0.0), *points]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def sustained_cloudrun(steps: list[Step], concurrency: int) -> float:
    """The rate one instance keeps once the autoscaler holds it at 60% of `concurrency` in flight and at 60% CPU:
    the lower of the two, read off the measured curve."""
    measured = sorted((s for s in steps if s.concurrency <= concurrency), key=lambda s: s.concurrency)
    by_concurrency = interpolate([(s.concurrency, s.rps) for s in measured], SCALE_TARGET * concurrency)
    with_cpu = [s for s in measured if s.cpu_util is not None]
    if with_cpu and max(s.cpu_util for s in with_cpu) > SCALE_TARGET:
        points = []
        for s in with_cpu:  # rps against CPU use, kept increasing in CPU
            if not points or s.cpu_util > points[-1][0]:
                points.append((s.cpu_util, s.rps))
        return min(by_concurrency, interpolate(points, SCALE_TARGET))
    return by_concurrency


def recommended_memory(target: str, vcpus: int, peak: int | None, shape_memory: int, size: str = "") -> tuple[int, str]:
    """Peak plus headroom, rounded up to 256 MiB and into what the platform allows for this CPU (or VM size); and a
    note when the peak does not fit at all."""
    if peak is None:
        return shape_memory, "no memory figure was measured: the shape's memory is kept"
    wanted = max(int(peak * HEADROOM), peak + HEADROOM_BYTES)
    wanted = math.ceil(wanted / (256 * MIB)) * 256 * MIB
    if target == "cloudrun":
        least, most = CLOUDRUN_MEMORY[vcpus]
    else:
        least, most = FLY_SIZES[size][2] * MIB, FLY_SIZES[size][3] * MIB
    note = ""
    if wanted > most:
        note = f"the measured peak plus headroom ({wanted // MIB} MiB) is over what this CPU allows: use a larger shape"
    return min(max(wanted, least), most), note


def recommend(shape: Shape, steps: list[Step], p99_ms: float) -> dict[str, Any] | None:
    """The point and the settings for one shape; None when no step met the objective."""
    best = best_step(steps, p99_ms)
    if best is None:
        return None
    peak = max((s.peak_rss_bytes for s in steps if s.peak_rss_bytes is not None), default=None)
    memory, memory_note = recommended_memory(shape.target, shape.vcpus, peak, shape.memory_bytes, shape.size)
    threads = max(1, math.ceil(shape.quota_cpus))
    service = {"WEB_CONCURRENCY": 1, "ORT_INTRA_OP_THREADS": threads}
    point = {"concurrency": best.concurrency, "rps": round(best.rps, 1), "p99_ms": round(best.p99_ms, 2),
             "p50_ms": round(best.p50_ms, 2), "lower_bound": best.lower_bound}  # fmt: skip
    if shape.target == "cloudrun":
        sustained = sustained_cloudrun(steps, best.concurrency)
        settings = {"concurrency": best.concurrency, "cpu": str(shape.vcpus),
                    "memory": cloudrun_memory_text(memory)}  # fmt: skip
    else:
        knee = min((s for s in steps if s.concurrency <= best.concurrency and meets(s, p99_ms)
                    and s.rps >= KNEE * best.rps), key=lambda s: s.concurrency)  # fmt: skip
        sustained = knee.rps
        settings = {"soft_limit": knee.concurrency, "hard_limit": best.concurrency, "size": shape.size,
                    "memory": fly_memory_text(memory)}  # fmt: skip
    point["sustained_rps"] = round(sustained, 1)
    if shape.target == "cloudrun":
        # Request-based billing counts an instance's time only while a request is in flight: held at 60% of a
        # concurrency of 1, it is idle (and unbilled) 40% of the time; from 2 on (1.2 in flight on average) it is
        # taken as always busy.
        point["billed_rps"] = round(sustained / min(1.0, SCALE_TARGET * best.concurrency), 1)
    return {"point": point, "settings": settings, "service": service, "memory_note": memory_note}
