"""Logs as one JSON object per line with `severity` and `message`, the form Cloud Logging grades and Fly shows.

The request's Cloud Run trace (from `X-Cloud-Trace-Context`) rides in a context variable that the access-log
middleware sets, so every line logged while serving that request carries it.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import sys
import time

# (trace id, span id, sampled) of the request being served, if it carried X-Cloud-Trace-Context.
current_trace: contextvars.ContextVar[tuple[str, str, bool] | None] = contextvars.ContextVar("trace", default=None)

_SEVERITY = {"WARNING": "WARNING", "CRITICAL": "CRITICAL", "ERROR": "ERROR", "INFO": "INFO", "DEBUG": "DEBUG"}
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


def parse_trace_header(value: str | None) -> tuple[str, str, bool] | None:
    """`TRACE_ID/SPAN_ID;o=1` -> (trace, span, sampled); None when absent or malformed."""
    if not value:
        return None
    trace, _, rest = value.partition("/")
    span, _, options = rest.partition(";")
    if not trace or not all(c in "0123456789abcdefABCDEF" for c in trace):
        return None
    return trace, span, options.strip() == "o=1"


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
        trace = current_trace.get()
        if trace:
            trace_id, span_id, sampled = trace
            entry["logging.googleapis.com/trace"] = (
                f"projects/{self.project}/traces/{trace_id}" if self.project else trace_id
            )
            if span_id:
                entry["logging.googleapis.com/spanId"] = span_id
            entry["logging.googleapis.com/trace_sampled"] = sampled
        return _ENCODER.encode(entry)


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
