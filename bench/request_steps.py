"""What each step of the request path costs, one at a time: `python -m bench.request_steps [demo|mlp]`.

In this process, on uvloop, the service's ASGI app answers the bench's one-row /predict body over and over, each
configuration built with one step toggled off (or on) and measured against the defaults and the bare floor app
(bench/floor_app.py), in interleaved runs. The figure is CPU time of the event-loop thread per request
(`time.thread_time`), which other people's work on a shared machine disturbs far less than throughput does; over
a real socket (`invoke bench`) each of these microseconds costs about twice as much, cache misses included.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import statistics
import sys
import time
from typing import Any

KEY = "k1-Zq9vX2mB7tLr4sW8yN3pHc6dF"
REPS = 9


def main(which: str = "demo") -> None:
    import uvloop

    from bench import floor_app, run
    from bench.asgi_calls import predict_call

    model = run.DEMO if which == "demo" else run.mlp()
    body = model.body()
    os.environ.update(MODEL_URI=str(model.path), EXIT_ON_LOAD_FAILURE_AFTER="-1", METRICS_PORT="9999")
    from service.app import create_app
    from service.settings import load_settings

    scope, receive, send = predict_call(body, (b"x-api-key", KEY.encode()))

    def service(**env: str) -> Any:
        app = create_app(load_settings({**os.environ, **env}))
        app.state.store.start()
        app.state.store.loaded.wait(120)
        app.logged.lines.stream = io.BytesIO()  # ACCESS_LOG=all writes here, not to the terminal
        return app

    async def measure() -> None:
        startup: asyncio.Queue = asyncio.Queue()
        await startup.put({"type": "lifespan.startup"})
        asyncio.ensure_future(floor_app._lifespan(startup.get, send))
        await asyncio.sleep(0.3)
        alone = service()
        alone.state.scheduler.in_flight = lambda: 1  # what service/worker.py reports at one client
        apps = {
            "floor (bench/floor_app.py)": floor_app.app,
            "service, defaults (in-process: yields a loop turn before each run)": service(),
            "- the batching yield (a request alone in the worker)": alone,
            "- shared-dimension check (CHECK_SHARED_DIMS=false)": service(CHECK_SHARED_DIMS="false"),
            "+ memory budget active (MEMORY_LIMIT_BYTES=8GiB)": service(MEMORY_LIMIT_BYTES=str(8 << 30)),
            "+ API keys on (API_KEYS, key sent)": service(API_KEYS=KEY),
            "- access log (ACCESS_LOG=off; default: errors)": service(ACCESS_LOG="off"),
            "+ access log of every request (ACCESS_LOG=all)": service(ACCESS_LOG="all"),
            "- metrics (METRICS_PORT=0)": service(METRICS_PORT="0"),
        }
        logging.getLogger("service.access").setLevel(logging.INFO)
        count = 2000 if which == "demo" else 300

        async def cpu_per_request(app: Any) -> float:
            started = time.thread_time()
            for _ in range(count):
                await app(scope(), receive, send)
            return (time.thread_time() - started) / count * 1e6

        for app in apps.values():
            await cpu_per_request(app)  # warm up
        runs: dict[str, list[float]] = {name: [] for name in apps}
        for rep in range(REPS):
            for name, app in list(apps.items())[:: 1 if rep % 2 else -1]:
                runs[name].append(await cpu_per_request(app))
        base = statistics.median(runs["service, defaults (in-process: yields a loop turn before each run)"])
        print(f"{model.label}: CPU µs of the event-loop thread per request, median of {REPS} interleaved runs of "
              f"{count} (range)")  # fmt: skip
        print("| configuration | µs | against the defaults |\n|---|---|---|")
        for name, times in runs.items():
            median = statistics.median(times)
            print(f"| {name} | {median:.1f} ({min(times):.1f}-{max(times):.1f}) | {median - base:+.1f} |")

    uvloop.run(measure())
    os._exit(0)  # the stores' loader threads and the floor's lifespan task: nothing to wait for


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
