"""A local stand-in of Cloud Monitoring's timeSeries.list (GET /v3/projects/PROJECT/timeSeries), serving the figures
each test arranges per Cloud Run revision: requests by response_code_class and the p99 latency.

It answers as the API does for the two queries `toolkit.monitoring` sends (one aligned point per series over the
window: https://cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.timeSeries/list): `request_count` grouped by
`metric.labels.response_code_class` with int64 values as strings, `request_latencies` reduced to REDUCE_PERCENTILE_99
as a doubleValue, and an empty object (no `timeSeries`) for a revision that had no requests. It checks what the real
API rejects: no bearer token (401), a filter without metric.type, an alignment period under 60 s, a cross-series
reducer without an aligner (400).

On demand it fails as the API can: `refuse(status)` answers every query with that status and Google's error body
(403 PERMISSION_DENIED, 500 INTERNAL, ...), `hang(seconds)` holds every answer that long (a timeout on the client's
side); both until set back to None / 0.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterator

import pytest


@dataclass
class RevisionFigures:
    """What one revision served in a window: answers by class (e.g. {"2xx": 990, "5xx": 10}) and the p99 in ms."""

    classes: dict[str, int] = field(default_factory=dict)
    p99_ms: float | None = None


HEALTHY = RevisionFigures({"2xx": 1000}, 120.0)
NO_TRAFFIC = RevisionFigures()


class MonitoringStub:
    def __init__(self, project: str = "stub-project"):
        self.project = project
        self.figures: dict[str, RevisionFigures] = {}  # by revision name
        self.default = HEALTHY  # any revision not in `figures`
        self.queries: list[dict[str, list[str]]] = []
        self.errors: list[str] = []
        self.refusal: int | None = None  # answer every query with this status
        self.hang_seconds = 0.0  # hold every answer this long
        self._stopping = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None

    def refuse(self, status: int | None) -> None:
        self.refusal = status

    def hang(self, seconds: float) -> None:
        self.hang_seconds = seconds

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def revisions_read(self) -> list[str]:
        return [re.search(r'revision_name="([^"]+)"', q["filter"][0]).group(1) for q in self.queries]

    def answer(self, path: str, query: dict[str, list[str]], authorization: str) -> tuple[int, dict]:
        if not authorization.startswith("Bearer "):
            return 401, _error(401, "Request is missing required authentication credential.", "UNAUTHENTICATED")
        match = re.fullmatch(r"/v3/projects/([^/]+)/timeSeries", path)
        if not match:
            return 404, _error(404, f"Unknown path {path}", "NOT_FOUND")
        if match.group(1) != self.project:
            return 403, _error(403, f"Permission monitoring.timeSeries.list denied on {match.group(1)}",
                               "PERMISSION_DENIED")
        self.queries.append(query)
        if self.hang_seconds:
            self._stopping.wait(self.hang_seconds)
        if self.refusal:
            status = {403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
            return self.refusal, _error(self.refusal, f"Injected failure {self.refusal}",
                                        status.get(self.refusal, "FAILED_PRECONDITION"))
        text = query.get("filter", [""])[0]
        metric = re.search(r'metric\.type="([^"]+)"', text)
        revision = re.search(r'resource\.labels\.revision_name="([^"]+)"', text)
        if not metric or not revision:
            return 400, _error(400, "Field filter had an invalid value: it needs metric.type", "INVALID_ARGUMENT")
        period = query.get("aggregation.alignmentPeriod", ["0s"])[0]
        if int(period.rstrip("s")) < 60:
            return 400, _error(400, "The alignment period must be at least 60s.", "INVALID_ARGUMENT")
        if "aggregation.crossSeriesReducer" in query and "aggregation.perSeriesAligner" not in query:
            return 400, _error(400, "A cross-series reducer needs a per-series aligner.", "INVALID_ARGUMENT")
        figures = self.figures.get(revision.group(1), self.default)
        resource = {"type": "cloud_run_revision", "labels": {"revision_name": revision.group(1)}}
        point_interval = {"startTime": query.get("interval.startTime", [""])[0],
                          "endTime": query.get("interval.endTime", [""])[0]}
        if metric.group(1) == "run.googleapis.com/request_count":
            series = [{"metric": {"type": metric.group(1), "labels": {"response_code_class": cls}},
                       "resource": resource, "metricKind": "DELTA", "valueType": "INT64",
                       "points": [{"interval": point_interval, "value": {"int64Value": str(count)}}]}
                      for cls, count in figures.classes.items() if count]
        elif metric.group(1) == "run.googleapis.com/request_latencies":
            series = [] if figures.p99_ms is None else [
                {"metric": {"type": metric.group(1)}, "resource": resource, "metricKind": "DELTA",
                 "valueType": "DOUBLE", "points": [{"interval": point_interval,
                                                    "value": {"doubleValue": figures.p99_ms}}]}]
        else:
            series = []
        return 200, ({"timeSeries": series, "unit": "1"} if series else {})

    def start(self) -> "MonitoringStub":
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                try:
                    status, body = stub.answer(parsed.path, urllib.parse.parse_qs(parsed.query),
                                               self.headers.get("Authorization", ""))
                except Exception as exc:  # a stub bug: make the test fail, not hang
                    stub.errors.append(repr(exc))
                    status, body = 500, _error(500, repr(exc), "INTERNAL")
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # a hanging answer ends now
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _error(code: int, message: str, status: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}


@contextlib.contextmanager
def monitoring_stub_server(**kwargs) -> Iterator[MonitoringStub]:
    stub = MonitoringStub(**kwargs).start()
    try:
        yield stub
    finally:
        stub.stop()
    if stub.errors:
        raise AssertionError(f"the monitoring stub failed while answering: {stub.errors}")


@pytest.fixture
def monitoring_stub() -> Iterator[MonitoringStub]:
    with monitoring_stub_server() as stub:
        yield stub
