"""Logs as one JSON object per line with `severity` and `message`, the form Cloud Logging grades and Fly shows.

The request's trace (from W3C `traceparent`, which Cloud Run sends, else `X-Cloud-Trace-Context`) rides in a
context variable that the access-log middleware sets, so every line logged while serving that request carries it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
import sys
import time
from typing import Any, BinaryIO

import orjson

# (trace id, span id as 16 hex digits or "", sampled) of the request being served, if it carried a trace header.
current_trace: contextvars.ContextVar[tuple[str, str, bool] | None] = contextvars.ContextVar("trace", default=None)

_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")
_CLOUD_TRACE = re.compile(rb"^([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([01]))?$")


def trace_from_headers(traceparent: bytes | None, cloud_trace: bytes | None) -> tuple[str, str, bool] | None:
    """The request's (trace, span, sampled): `traceparent` first, then `X-Cloud-Trace-Context`; a header that is
    malformed in any way (wrong form, all-zero ids, bytes that are not ASCII) counts as absent."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip())
        if match:
            version, trace, span, flags = (group.decode() for group in match.groups())
            if version != "ff" and trace.strip("0") and span.strip("0"):
                return trace, span, bool(int(flags, 16) & 1)
    if cloud_trace:
        match = _CLOUD_TRACE.match(cloud_trace.strip())
        if match:
            trace, span, sampled = match.groups()
            span_id = int(span) if span else 0
            if trace.strip(b"0") and span_id < 2**64:
                return trace.decode().lower(), f"{span_id:016x}" if span_id else "", sampled == b"1"
    return None

_SEVERITY = {"WARNING": "WARNING", "CRITICAL": "CRITICAL", "ERROR": "ERROR", "INFO": "INFO", "DEBUG": "DEBUG"}
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    project = ""  # set by configure(): "projects/P/traces/T" is what Cloud Logging links to a trace

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": _utc_second(int(record.created)) + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        add_trace(entry, self.project)
        return _ENCODER.encode(entry)


def add_trace(entry: dict[str, object], project: str) -> None:
    """The fields that link a line to its request's trace in Cloud Logging."""
    trace = current_trace.get()
    if trace:
        trace_id, span_id, sampled = trace
        entry["logging.googleapis.com/trace"] = f"projects/{project}/traces/{trace_id}" if project else trace_id
        if span_id:
            entry["logging.googleapis.com/spanId"] = span_id
        entry["logging.googleapis.com/trace_sampled"] = sampled


_LEVEL_NAMES = {logging.INFO: "INFO", logging.WARNING: "WARNING"}


class AccessLines:
    """Access-log lines in the same JSON form as every other line, written without the logging machinery.

    A line per request through a Logger, a handler lock, a formatter and one write per line cost the service
    more than a small model's inference (docs/benchmarks.md). Here each line is one orjson call, and the lines
    of one turn of the event loop go out in one write at the end of that turn.
    """

    def __init__(self, stream: BinaryIO | None = None):
        self.stream = stream
        self.pending: list[bytes] = []
        self.logger = logging.getLogger("service.access")

    def enabled(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def request(self, level: int, scope: dict, headers: dict[bytes, bytes], status: int, size: int, seconds: float) -> None:
        """The line for one request, in Cloud Logging's httpRequest form."""
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string")
        client = scope.get("client")
        self.write(level, f"{method} {path} {status}", {
            "requestMethod": method,
            "requestUrl": path + "?" + query.decode("latin-1") if query else path,
            "status": status,
            "responseSize": str(size),
            "latency": f"{seconds:.6f}s",
            "userAgent": headers.get(b"user-agent", b"").decode("utf-8", "replace"),
            "remoteIp": client[0] if client else "",
            "protocol": "HTTP/" + scope.get("http_version", "1.1"),
        })  # fmt: skip

    def write(self, level: int, message: str, http_request: dict[str, Any]) -> None:
        now = time.time()
        second = int(now)
        entry = {
            "severity": _LEVEL_NAMES.get(level) or logging.getLevelName(level),
            "message": message,
            "time": f"{_utc_second(second)}.{int((now - second) * 1000):03d}Z",
            "logger": "service.access",
            "httpRequest": http_request,
        }
        add_trace(entry, JsonFormatter.project)
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))

    def flush(self) -> None:
        data = b"".join(self.pending)
        self.pending.clear()
        stream = self.stream or sys.stdout.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):  # stdout closed at shutdown: the lines have nowhere to go
            pass


# What json.dumps(entry, default=str) builds on every call, built once: an access-log line per request adds up.
_ENCODER = json.JSONEncoder(default=str)


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def skip_unlogged_fields() -> None:
    """The JSON lines never show a record's caller, thread, process or task (see _RECORD_FIELDS), so logging need
    not look them up for every record (the logging HOWTO, "Optimization"): one access-log line per request adds up.
    """
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = logging.logAsyncioTasks = False


def logging_config(level: str = "info") -> dict:
    """A dictConfig for the service's, gunicorn's and uvicorn's loggers: JSON lines on stdout."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}
    quiet = {"handlers": [], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stdout": handler},
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            "gunicorn.error": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
            # The service writes its own access log line (with latency and trace); these would repeat it.
            "gunicorn.access": quiet,
            "uvicorn.access": quiet,
            "uvicorn.error": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
        },
    }


def configure(level: str = "info", project: str = "") -> None:
    import logging.config

    JsonFormatter.project = project
    skip_unlogged_fields()
    logging.config.dictConfig(logging_config(level))


def fatal(message: str) -> None:
    """Print one ERROR line to stderr, for start-up failures that happen before logging is configured."""
    print(json.dumps({"severity": "ERROR", "message": message}), file=sys.stderr, flush=True)
