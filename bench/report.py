"""Figures, each beside its floor and target, as a table for people and as JSON for tools."""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def floors(figures: list[Figure]) -> str:
    """What each floor is, once per kind, under the table."""
    seen: dict[str, None] = {}
    for f in figures:
        if f.floor_label:
            seen.setdefault(f.floor_label)
    return "\n".join(f"- {label}" for label in seen)


def write_json(path: Path, figures: list[Figure], context: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**context, "figures": {f.key: f.as_json() for f in figures}}
    path.write_text(json.dumps(document, indent=2) + "\n")
