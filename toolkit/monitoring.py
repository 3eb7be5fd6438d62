"""Cloud Monitoring figures of one Cloud Run revision over a window: requests by response class and the p99
latency, read from the timeSeries REST API with the deployer's credentials
(https://cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.timeSeries/list). `release` judges each
traffic step on them.

Cloud Monitoring samples Cloud Run every 60 s and shows a sample up to 180 s later: a window shorter than a few
minutes is noise, and a step is read only after `release.ingestion_delay`.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import httpx
from invoke import Context, Exit

REQUEST_COUNT = "run.googleapis.com/request_count"
REQUEST_LATENCIES = "run.googleapis.com/request_latencies"
SCOPE = "https://www.googleapis.com/auth/monitoring.read"
VIEWER_ROLE = "roles/monitoring.viewer"


@dataclass(frozen=True)
class Figures:
    """One revision over one window: requests that reached it, how many answered 5xx, and their p99 in ms."""

    revision: str
    requests: int
    errors: int  # 5xx answers
    p99_ms: float | None  # None: no request in the window

    @property
    def error_share(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def describe(self) -> str:
        p99 = "no latency" if self.p99_ms is None else f"p99 {self.p99_ms:.0f} ms"
        return f"{self.requests} requests, {self.errors} 5xx ({100 * self.error_share:.2f}%), {p99}"


def _filter(c: Context, metric: str, revision: str) -> str:
    return (f'metric.type="{metric}" AND resource.type="cloud_run_revision" AND '
            f'resource.labels.project_id="{c.gcp.project}" AND resource.labels.location="{c.gcp.region}" AND '
            f'resource.labels.service_name="{c.cloudrun.service}" AND resource.labels.revision_name="{revision}"')


def _rfc3339(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def queries(c: Context, revision: str, start: float, end: float) -> dict[str, dict]:
    """The two timeSeries.list queries for a revision: one aligned point per series over the whole window."""
    period = f"{max(60, math.ceil((end - start) / 60) * 60)}s"  # the API's minimum alignment is 60 s
    interval = {"interval.startTime": _rfc3339(start), "interval.endTime": _rfc3339(end),
                "aggregation.alignmentPeriod": period}
    return {
        "requests": {"filter": _filter(c, REQUEST_COUNT, revision), **interval,
                     "aggregation.perSeriesAligner": "ALIGN_DELTA", "aggregation.crossSeriesReducer": "REDUCE_SUM",
                     "aggregation.groupByFields": "metric.labels.response_code_class"},
        "latency": {"filter": _filter(c, REQUEST_LATENCIES, revision), **interval,
                    "aggregation.perSeriesAligner": "ALIGN_PERCENTILE_99",
                    "aggregation.crossSeriesReducer": "REDUCE_PERCENTILE_99"},
    }


def url(c: Context) -> str:
    return f"{c.release.monitoring_endpoint.rstrip('/')}/v3/projects/{c.gcp.project}/timeSeries"


def describe_queries(c: Context, revision: str) -> list[str]:
    """What --dry-run prints: each query as a GET line."""
    return [f"GET {url(c)}?{httpx.QueryParams(q)}" for q in queries(c, revision, 0, 300).values()]


def access_token(c: Context) -> str:
    """A key file named by GOOGLE_APPLICATION_CREDENTIALS (CI) through google-auth; otherwise the deployer's gcloud
    account, the same identity that moves the traffic."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        import google.auth
        import google.auth.exceptions
        import google.auth.transport.requests

        try:
            credentials, _ = google.auth.default(scopes=[SCOPE])
            credentials.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.GoogleAuthError as exc:
            raise Exit(f"no credentials to read Cloud Monitoring from GOOGLE_APPLICATION_CREDENTIALS: {exc}; point it "
                       "at a service-account key file, or unset it to use gcloud's account") from None
        return credentials.token
    result = c.run("gcloud auth print-access-token", hide=True, warn=True)
    if not result.ok:
        raise Exit(f"no credentials to read Cloud Monitoring: run `gcloud auth login`.\n{result.stderr}")
    return result.stdout.strip()


def _series(client: httpx.Client, c: Context, params: dict) -> list[dict]:
    series, token = [], ""
    while True:
        response = client.get(url(c), params={**params, **({"pageToken": token} if token else {})})
        if response.status_code == 403:
            raise Exit(f"Cloud Monitoring refused to read figures (403): the deployer needs {VIEWER_ROLE} on "
                       f"{c.gcp.project}; `invoke gcp.setup` grants it.")
        if response.status_code != 200:
            raise Exit(f"Cloud Monitoring answered {response.status_code}: {response.text[:300]}")
        body = response.json()
        if body.get("executionErrors"):
            raise Exit(f"Cloud Monitoring could not evaluate {params['filter']!r}: {body['executionErrors']}")
        series += body.get("timeSeries", [])
        token = body.get("nextPageToken", "")
        if not token:
            return series


def _value(point: dict) -> float:
    value = point.get("value", {})
    return float(value.get("int64Value", value.get("doubleValue", 0)))


def read(c: Context, revision: str, start: float, end: float, token: str) -> Figures:
    """The revision's figures between `start` and `end` (Unix seconds); Exit when Cloud Monitoring does not answer
    within release.monitoring_timeout."""
    wanted = queries(c, revision, start, end)
    timeout = float(c.release.monitoring_timeout)
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as client:
            requests = errors = 0
            for series in _series(client, c, wanted["requests"]):
                count = int(sum(_value(p) for p in series.get("points", [])))
                requests += count
                if series.get("metric", {}).get("labels", {}).get("response_code_class") == "5xx":
                    errors += count
            latencies = [_value(p) for s in _series(client, c, wanted["latency"]) for p in s.get("points", [])]
    except httpx.TransportError as exc:
        raise Exit(f"Cloud Monitoring did not answer ({type(exc).__name__} after up to {timeout:g}s, "
                   f"release.monitoring_timeout): {exc}") from None
    return Figures(revision, requests, errors, max(latencies) if latencies else None)
