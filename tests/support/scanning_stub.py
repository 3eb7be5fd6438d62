"""The On-Demand Scanning API (ondemandscanning.googleapis.com v1), plugged into the gcloud stub, for
`gcloud artifacts docker images scan --remote` and `gcloud artifacts docker images list-vulnerabilities`.

gcloud first runs its `local-extract` component to list the image's packages, then POSTs them to
`projects/P/locations/L/scans:analyzePackages`, polls the returned operation, and prints its response
(`{"scan": "projects/P/locations/L/scans/ID"}`); `list-vulnerabilities SCAN` reads `SCAN/vulnerabilities`.
The tests arrange `findings` (Grafeas vulnerability occurrences) that every scan reports.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from tests.support.gcloud_stub import ApiError, GcloudStub, RecordedRequest

RESPONSE_TYPE = "type.googleapis.com/google.cloud.ondemandscanning.v1.AnalyzePackagesResponse"
SEVERITIES = ("MINIMAL", "LOW", "MEDIUM", "HIGH", "CRITICAL")


def finding(cve: str, severity: str, package: str, version: str, fixed: str = "") -> dict:
    """A vulnerability as a scan reports it (Grafeas v1 occurrence, kind VULNERABILITY, an OS package)."""
    assert severity in SEVERITIES
    issue: dict[str, Any] = {
        "affectedPackage": package,
        "affectedVersion": {"name": version, "kind": "NORMAL", "fullName": version},
        "affectedCpeUri": "cpe:/o:debian:debian_linux:12",
        "packageType": "OS",
    }
    if fixed:
        issue["fixedVersion"] = {"name": fixed, "kind": "NORMAL", "fullName": fixed}
    return {
        "kind": "VULNERABILITY",
        "noteName": f"projects/goog-vulnz/notes/{cve}",
        "vulnerability": {"severity": severity, "effectiveSeverity": severity, "shortDescription": cve,
                          "packageIssue": [issue], "fixAvailable": bool(fixed)},
    }  # fmt: skip


class OnDemandScanning:
    """State of the fake API: the scans made (with the packages and image gcloud sent) and the findings to report."""

    def __init__(self, stub: GcloudStub):
        self.stub = stub
        self.findings: list[dict] = []
        self.scans: dict[str, dict] = {}  # scan name -> {"resourceUri", "packages"}
        self.operations: dict[str, dict] = {}
        stub.plug("ondemandscanning", self.handle)

    def handle(self, request: RecordedRequest) -> Any:
        path = request.path.lstrip("/")
        analyze = re.fullmatch(r"v1/(projects/([^/]+)/locations/([^/]+))/scans:analyzePackages", path)
        if analyze and request.method == "POST":
            return self._analyze(analyze.group(1), analyze.group(2), request.body or {})
        operation = re.fullmatch(r"v1/(projects/[^/]+/locations/[^/]+/operations/[^/]+)", path)
        if operation and request.method == "GET":
            if operation.group(1) not in self.operations:
                raise ApiError(404, f"Operation {operation.group(1)} not found.")
            return self.operations[operation.group(1)]
        listing = re.fullmatch(r"v1/(projects/[^/]+/locations/[^/]+/scans/[^/]+)/vulnerabilities", path)
        if listing and request.method == "GET":
            scan = self.scans.get(listing.group(1))
            if scan is None:
                raise ApiError(404, f"Scan {listing.group(1)} not found (scans are kept for 48 hours).")
            return {"occurrences": [{**f, "name": f"{listing.group(1)}/occurrences/{i}", "resourceUri":
                                     scan["resourceUri"]} for i, f in enumerate(self.findings)]}  # fmt: skip
        raise ApiError(404, f"The On-Demand Scanning stub does not serve {request.method} {request.path}.")

    def _analyze(self, parent: str, project: str, body: dict) -> dict:
        if project != self.stub.project:
            raise ApiError(403, f"Permission denied on project {project}.")
        if not body.get("resourceUri"):
            raise ApiError(400, "resource_uri is required")
        scan = f"{parent}/scans/{uuid.uuid4()}"
        self.scans[scan] = {"resourceUri": body["resourceUri"], "packages": body.get("packages", [])}
        name = f"{parent}/operations/{uuid.uuid4()}"
        self.operations[name] = {"name": name, "done": True, "response": {"@type": RESPONSE_TYPE, "scan": scan}}
        return self.operations[name]
