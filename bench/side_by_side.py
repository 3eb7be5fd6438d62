"""The floor and the service from one or more checkouts, measured together over HTTP: the A/B of a request-path
change, as `invoke bench` measures throughput (`bench.throughput.measure`: every server up at once, turns in an
order that alternates between repetitions, so drift in the machine's load falls on them alike).

    python -m bench.side_by_side demo|mlp CLIENTS REPS SECONDS NAME=CHECKOUT[:ENV=VALUE,...] ...

    python -m bench.side_by_side demo 1,8,64 5 4 before=/tmp/main-before after=.
    python -m bench.side_by_side demo 8 5 4 on=. off=.:METRICS_PORT=0   # one setting's cost

Each NAME=CHECKOUT serves `service.app:app` from that directory (a `git worktree` of another commit, say),
with ENV=VALUE pairs added to its environment; the floor (bench/floor_app.py) is served from this checkout. For
each concurrency it prints the floor's requests per second, p99 and CPU per request, then each service's ratio
to the floor (requests per second, p99) and CPU per request. CPU per request is the server's process-group CPU
time over the requests answered: on a saturated core, the figure a change moves.

Why: at 8 clients, where the service's one core is saturated, only a measurement over HTTP says what a change
is worth. Bytecode counts (`bench.request_bytecodes`) and in-process timers (`bench.request_steps`) miss what a
future's callbacks, a numpy attribute or a cold cache cost there (docs/benchmarks.md, round 4).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from bench import run, throughput
from bench.servers import PROBED_WORKER, Server
from tests.support.models import ROOT
from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.server import GUNICORN, service_env


def starter(app: str, checkout: Path, env: dict[str, str], model: Path, logs: Path) -> Callable[[], ContextManager[Server]]:
    """Starts `app` from `checkout` under gunicorn with the service's config and the bench's worker."""

    @contextlib.contextmanager
    def start() -> Iterator[Server]:
        port = free_port()
        log = logs / f"{app.split(':')[0]}-{port}.log"
        environment = service_env(str(model), port, **env)
        environment["PYTHONPATH"] = str(checkout)
        with open(log, "wb") as out:
            process = subprocess.Popen([*GUNICORN[:-1], "-k", PROBED_WORKER, app], cwd=checkout, env=environment,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            yield Server(process, port, time.perf_counter(), log)
        finally:
            stop(process)

    return start


def parse(spec: str) -> tuple[str, Path, dict[str, str]]:
    """NAME=CHECKOUT[:ENV=VALUE,...] -> (name, checkout, env)."""
    name, _, rest = spec.partition("=")
    checkout, _, extra = rest.partition(":")
    if not name or not checkout or name == "floor":
        raise SystemExit(f"{spec!r}: give NAME=CHECKOUT[:ENV=VALUE,...], NAME not 'floor'")
    env = dict(pair.split("=", 1) for pair in extra.split(",") if pair)
    path = Path(checkout).resolve()
    if not (path / "service" / "app.py").is_file():
        raise SystemExit(f"{checkout}: not a checkout of this project (no service/app.py)")
    return name, path, env


def main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[0] not in ("demo", "mlp"):
        raise SystemExit(__doc__)
    model = run.DEMO if argv[0] == "demo" else run.mlp()
    clients = tuple(int(c) for c in argv[1].split(","))
    reps, seconds = int(argv[2]), float(argv[3])
    logs = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    starters = {"floor": starter("bench.floor_app:app", ROOT, {}, model.path, logs)}
    for name, checkout, env in map(parse, argv[4:]):
        starters[name] = starter("service.app:app", checkout, env, model.path, logs)
    got, _ = throughput.measure(starters, model.body(), clients, seconds, 1.0, reps, lambda line: None)
    print(f"{model.label}, {reps} runs of {seconds:g} s per point; load average {os.getloadavg()[0]:.2f}; "
          f"server logs in {logs}")  # fmt: skip
    for count in clients:
        floor = got["floor", count]
        line = (f"{count:>3} clients: floor {floor.requests_per_second:,.0f} req/s, p99 {floor.p99 * 1e3:.3f} ms, "
                f"CPU {floor.server_cpu_share / floor.requests_per_second * 1e6:.0f} us/req")  # fmt: skip
        for name in starters:
            if name != "floor":
                figures = got[name, count]
                line += (f" | {name} {figures.requests_per_second / floor.requests_per_second:.2f}x, "
                         f"p99 {figures.p99 / floor.p99:.2f}x, "
                         f"CPU {figures.server_cpu_share / figures.requests_per_second * 1e6:.0f} us/req, "
                         f"{figures.errors} errors")  # fmt: skip
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
