"""Find LitServe's best `batch_timeout` for the side-by-side table: `python -m bench.litserve_timeout [SECONDS ...]`.

Measures LitServe (max_batch_size 64, one worker) with each timeout on both models at 1, 8 and 64 clients and
prints requests/s; the best is the highest geometric mean over all six. Put it in run.LITSERVE_BATCH_TIMEOUT.
"""

from __future__ import annotations

import statistics
import sys

from bench import run, throughput, venvs
from bench.servers import litserve

TIMEOUTS = (0.001, 0.005, 0.01)


def main(timeouts: tuple[float, ...], seconds: float = 3, warmup: float = 1) -> None:
    python = venvs.litserve_python(print)
    logs = run.WORK / "litserve-timeout"
    logs.mkdir(parents=True, exist_ok=True)
    rps: dict[float, list[float]] = {timeout: [] for timeout in timeouts}
    for model in (run.DEMO, run.mlp()):
        path = model.path
        starters = {
            f"{timeout:g} s": lambda timeout=timeout: litserve(python, path, logs, run.LITSERVE_MAX_BATCH_SIZE, timeout)
            for timeout in timeouts
        }
        print(f"{model.label}:")
        got, _ = throughput.measure(
            starters, model.body(), run.CONCURRENCY, seconds, warmup, 1, print, alone=tuple(starters)
        )
        for timeout in timeouts:
            rps[timeout] += [got[f"{timeout:g} s", clients].requests_per_second for clients in run.CONCURRENCY]
    means = {timeout: statistics.geometric_mean(values) for timeout, values in rps.items()}
    for timeout, mean in means.items():
        print(f"batch_timeout {timeout:g} s: geometric mean {mean:,.0f} req/s ({', '.join(f'{v:,.0f}' for v in rps[timeout])})")
    print(f"best: {max(means, key=means.get):g} s")


if __name__ == "__main__":
    main(tuple(float(arg) for arg in sys.argv[1:]) or TIMEOUTS)
