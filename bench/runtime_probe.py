"""Which event loop and HTTP parser a server really runs, as one line in its log: "bench-runtime loop=... http=...".

uvicorn picks both when its config loads (`loop="auto"`, `http="auto"`: uvloop and httptools when importable,
else asyncio and h11), so the probe reads them right after `Config.load()`, from inside the running loop. It
touches nothing on the request path. Dependency-free, so LitServe's own virtual environment imports it too.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

MARK = "bench-runtime"
_LINE = re.compile(rf"{MARK} loop=(\S+) http=(\S+)")


def _report(config: Any) -> None:
    loop = type(asyncio.get_running_loop())
    # uvicorn's own protocol class (the service's worker subclasses httptools'): the parser it runs on.
    protocol = next((c for c in config.http_protocol_class.__mro__ if c.__module__.startswith("uvicorn.protocols.http.")),
                    config.http_protocol_class)  # fmt: skip
    print(f"{MARK} loop={loop.__module__}.{loop.__qualname__} http={protocol.__module__}.{protocol.__qualname__}",
          file=sys.stderr, flush=True)  # fmt: skip


def report_every_config() -> None:
    """Every uvicorn Config loaded in this process writes the probe line (for servers that make their own)."""
    import uvicorn

    load = uvicorn.Config.load

    def load_and_report(config: Any) -> None:
        load(config)
        _report(config)

    uvicorn.Config.load = load_and_report


def read(log: str) -> str:
    """'uvloop + httptools' (or whatever else the probe line says) from a server's log."""
    found = _LINE.search(log)
    if not found:
        return "unknown (no probe line in its log)"
    loop, http = found.groups()
    loop_name = {"uvloop": "uvloop", "asyncio": "asyncio"}.get(loop.split(".")[0], loop)
    http_name = {"httptools_impl": "httptools", "h11_impl": "h11"}.get(http.split(".")[-2], http)
    return f"{loop_name} + {http_name}"


try:
    from service.worker import Worker
except ImportError:  # LitServe's environment has no gunicorn
    pass
else:

    class UvicornWorker(Worker):
        """The service's worker class (service/worker.py), unchanged but for the probe line:
        `gunicorn -k bench.runtime_probe.UvicornWorker`."""

        async def _serve(self) -> None:
            load = self.config.load

            def load_and_report() -> None:
                load()
                _report(self.config)

            self.config.load = load_and_report
            await super()._serve()
