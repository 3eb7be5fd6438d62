"""Figures, each beside its floor and target, as a table for people and as JSON for tools."""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, "==": operator.eq}
# unit -> (scale from seconds or bytes, format)
_UNITS = {
    "s": (1, "{:.2f} s"), "ms": (1e3, "{:.2f} ms"), "MB": (1 / 2**20, "{:.0f} MB"), "req/s": (1, "{:,.0f} req/s"),
    "": (1, "{:g}"),
}  # fmt: skip


@dataclass
class Figure:
    """One measured figure. Times are seconds and sizes bytes; `unit` only says how to print them.

    The target bounds `ratio` = value / floor when the figure has a floor (`floor_label`), else the value itself
    (errors == 0).
    """

    key: str
    label: str
    unit: str
    value: float | None
    floor: float | None = None
    floor_label: str = ""
    target: str = ""  # "<= 1.3", ">= 0.6", "== 0", or "" for a figure reported without a target
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.floor:
            return None
        return self.value / self.floor

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        measured = self.ratio if self.floor_label else self.value
        return None if measured is None else _COMPARE[op](measured, float(bound))

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def show(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    scale, form = _UNITS[unit]
    return form.format(value * scale)


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "floor", "ratio", "target", "met?")]
    for f in figures:
        floor = show(f.floor, f.unit) if f.floor is not None else ""
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        target = (f"ratio {f.target}" if f.floor_label else f.target) if f.target else ""
        met = {True: "yes", False: "NO", None: ""}[f.met]
        value = f.note if f.value is None and f.note else show(f.value, f.unit)
        rows.append((f.label, value, floor, ratio, target, met))
    return markdown_table(rows)


def floors(figures: list[Figure]) -> str:
    """What each floor is, once per kind, under the table."""
    seen: dict[str, None] = {}
    for f in figures:
        if f.floor_label:
            seen.setdefault(f.floor_label)
    return "\n".join(f"- {label}" for label in seen)


def write_json(path: Path, figures: list[Figure], rows: list[LoadRow], context: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**context, "figures": {f.key: f.as_json() for f in figures}, "side_by_side": [r.as_json() for r in rows]}
    path.write_text(json.dumps(document, indent=2) + "\n")


@dataclass
class LoadRow:
    """One server at one concurrency on one model, beside the floor measured in the same run. Times in seconds.

    `targets` holds what the issue asks of this row (only the service's rows have any), `misses` those it missed.
    """

    model: str
    clients: int
    server: str
    requests_per_second: float
    p50: float
    p99: float
    errors: int
    server_cpu_share: float  # CPU used while the load ran, in cores: the server (all its processes), the load
    loadgen_cpu_share: float  # generator and every other process on the machine
    others_cpu_share: float
    floor_requests_per_second: float
    floor_p99: float
    targets: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    @property
    def rps_ratio(self) -> float:
        return self.requests_per_second / self.floor_requests_per_second

    @property
    def p99_ratio(self) -> float:
        return self.p99 / self.floor_p99

    @property
    def requests_per_cpu_second(self) -> float:
        """Requests answered per second of the server's own CPU time: what a request costs it, however much CPU
        other processes left it on a shared machine."""
        return self.requests_per_second / self.server_cpu_share

    @property
    def met(self) -> bool | None:
        return None if not self.targets else not self.misses

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rps_ratio": self.rps_ratio, "p99_ratio": self.p99_ratio,
                "requests_per_cpu_second": self.requests_per_cpu_second, "met": self.met}  # fmt: skip


def side_by_side(rows: list[LoadRow]) -> str:
    header = ("model", "clients", "server", "req/s", "p50", "p99", "errors", "req/s vs floor", "p99 vs floor",
              "CPU: server / load gen / others", "req per server CPU-s", "target", "met?")  # fmt: skip
    cells = [header]
    for r in rows:
        met = {True: "yes", False: "NO: " + ", ".join(r.misses), None: ""}[r.met]
        cells.append((
            r.model, str(r.clients), r.server, show(r.requests_per_second, "req/s").removesuffix(" req/s"),
            show(r.p50, "ms"), show(r.p99, "ms"), str(r.errors), f"{r.rps_ratio:.2f}x", f"{r.p99_ratio:.2f}x",
            f"{r.server_cpu_share:.2f} / {r.loadgen_cpu_share:.2f} / {r.others_cpu_share:.2f}",
            f"{r.requests_per_cpu_second:,.0f}", "; ".join(r.targets), met,
        ))  # fmt: skip
    return markdown_table(cells)


def markdown_table(cells: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
