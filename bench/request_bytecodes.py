"""How many Python bytecodes one POST /predict executes, by function: `python -m bench.request_bytecodes [K]`.

In this process, the service's ASGI app and the bare floor (bench/floor_app.py) each answer the demo model's
one-row body, K requests at a time (default 4: the scheduler then batches them, as it does at 8 clients over
HTTP), while `sys.monitoring` counts every bytecode each function executes. Unlike a timer, the count is the same
on every run and on any machine, so a change to the request path shows its effect exactly.

Why count bytecodes: over a real socket, the event loop's system calls between two requests leave the
interpreter's caches cold, and each bytecode then costs about 20 ns on this project's 2-CPU test machine against
5-8 ns in a loop (docs/benchmarks.md, "The request path against its floor"). The count shows where a path's
Python goes; what a change is worth, only a measurement over HTTP says (`bench.side_by_side`): work done in C
(a future's callbacks, a numpy attribute) costs far more there than its bytecodes (docs/benchmarks.md, round 4).
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
from pathlib import Path
from typing import Any

TOOL = 3  # a sys.monitoring tool id the debugger and profilers (0-2, 5) do not claim
ROUNDS = 20


def main(k: int = 4) -> None:
    import uvloop

    from bench import floor_app, run
    from bench.asgi_calls import predict_call

    body = run.DEMO.body()
    # Metrics on, as deployed; their flush (every 0.1 s by default, for thousands of requests) out of the count, so
    # that the count is the same on every run.
    os.environ.update(MODEL_URI=str(run.DEMO.path), EXIT_ON_LOAD_FAILURE_AFTER="-1", METRICS_PORT="9999",
                      METRICS_FLUSH_SECONDS="60")  # fmt: skip
    from service.app import create_app
    from service.settings import load_settings

    scope, receive, send = predict_call(body)

    service = create_app(load_settings(dict(os.environ)))
    service.state.store.start()
    service.state.store.loaded.wait(120)  # its after-load steps, the batching self-test among them, done
    service.state.scheduler.in_flight = lambda: k  # what service/worker.py reports with k requests begun
    counts: collections.Counter[str] = collections.Counter()
    root = str(Path(__file__).resolve().parent.parent)

    def counted(code: Any, offset: int) -> None:
        where = os.path.relpath(code.co_filename, root) if code.co_filename.startswith(root) else Path(code.co_filename).name
        counts[f"{code.co_qualname} ({where})"] += 1

    async def measure() -> None:
        startup: asyncio.Queue = asyncio.Queue()
        await startup.put({"type": "lifespan.startup"})
        asyncio.ensure_future(floor_app._lifespan(startup.get, send))
        while floor_app._session is None:  # the floor's lifespan opens its session
            await asyncio.sleep(0.05)
        apps = {"service": service, "floor": floor_app.app}
        for app in apps.values():  # warm: first calls import and cache
            for _ in range(5):
                await asyncio.gather(*(app(scope(), receive, send) for _ in range(k)))
        # The harness's own bytecodes (gather, tasks): counted with a no-op app, then subtracted.
        async def nothing(scope: dict, receive: Any, send: Any) -> None:
            return None

        totals = {}
        for name, app in {"harness": nothing, **apps}.items():
            counts.clear()
            monitoring = sys.monitoring
            monitoring.use_tool_id(TOOL, "bench.request_bytecodes")
            monitoring.register_callback(TOOL, monitoring.events.INSTRUCTION, counted)
            monitoring.set_events(TOOL, monitoring.events.INSTRUCTION)
            try:
                for _ in range(ROUNDS):
                    await asyncio.gather(*(app(scope(), receive, send) for _ in range(k)))
            finally:
                monitoring.set_events(TOOL, 0)
                monitoring.free_tool_id(TOOL)
            totals[name] = {f: c / (ROUNDS * k) for f, c in counts.items()}
        harness = totals.pop("harness")
        print(f"bytecodes per POST /predict of the demo model, {k} requests at a time (the harness's own "
              f"{sum(harness.values()):.0f} taken off)")
        for name, by_function in totals.items():
            own = {f: c - harness.get(f, 0.0) for f, c in by_function.items()}
            print(f"{name}: {sum(own.values()):.0f}")
            for function, count in sorted(own.items(), key=lambda item: -item[1])[:25 if name == "service" else 8]:
                if count >= 0.5:
                    print(f"  {count:7.1f}  {function}")

    uvloop.run(measure())
    os._exit(0)  # the store's loader threads and the floor's lifespan task: nothing to wait for


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
