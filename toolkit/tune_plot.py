"""`invoke tune --plot`: rps and p99 against concurrency, one line per shape, the objective as a line and each shape's
recommended point ringed (the chosen shape's starred). PNG or SVG by the file's suffix; matplotlib is a dev
requirement, so the task says how to get it when it is missing."""

from __future__ import annotations

from pathlib import Path

from invoke import Exit


def plot(document: dict, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise Exit("tune --plot needs matplotlib: pip install -r requirements-dev.txt") from None
    if path.suffix.lower() not in {".png", ".svg"}:
        raise Exit(f"--plot {path}: give a .png or .svg path")
    figure, (rps_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    chosen = (document.get("choice") or {}).get("shape")
    for shape in document["shapes"]:
        steps = shape["steps"]
        if not steps:
            continue
        levels = [s["concurrency"] for s in steps]
        # a shape whose load generator saturated or shared its CPUs: dashed, and said in the legend
        lower = any(s["lower_bound"] for s in steps)
        label, style = (f"{shape['name']} (lower bound)", "--") if lower else (shape["name"], "-")
        (line,) = rps_axis.plot(levels, [s["rps"] for s in steps], style, marker="o", label=label)
        p99_axis.plot(levels, [s["p99_ms"] for s in steps], style, marker="o", color=line.get_color(), label=label)
        rec = shape.get("recommended")
        if rec:
            star = shape["name"] == chosen
            for axis, value in ((rps_axis, rec["rps"]), (p99_axis, rec["p99_ms"])):
                axis.scatter([rec["concurrency"]], [value], s=260 if star else 160, marker="*" if star else "o",
                             facecolors=line.get_color() if star else "none", edgecolors="black", zorder=5)  # fmt: skip
    p99_axis.axhline(document["slo"]["p99_ms"], color="red", linestyle="--",
                     label=f"objective p99 {document['slo']['p99_ms']:g} ms")  # fmt: skip
    for axis, title in ((rps_axis, "requests per second"), (p99_axis, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency (requests in flight)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    p99_axis.set_yscale("log")
    p99_axis.legend(fontsize=8)
    run = document["run"]
    figure.suptitle(f"invoke tune --target {document['target']}: model sha256 {run.get('model_sha256', '')[:12]}, "
                    f"{run['date']} (ringed: recommended; starred: chosen)", fontsize=10)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
