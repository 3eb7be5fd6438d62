"""A local stand-in for the Google APIs that the real `gcloud` calls to deploy to Cloud Run and build with Cloud Build.

Deploy tasks are tested by running the real gcloud binary against this stub: gcloud parses the flags, builds the
Service object and polls exactly as it does against Google, and the test asserts on what gcloud sent.

How gcloud reaches it (see `GcloudStub.env`):
- every API endpoint is overridden to an `http://NAME.stub.invalid/` host, and gcloud talks through an HTTP proxy that
  is this stub (`CLOUDSDK_PROXY_*`). gcloud puts the region in front of the Cloud Run host
  (`us-central1-run.stub.invalid`), so the stub reads the region from the absolute URL it receives as a proxy.
- the few URLs gcloud does not take from the overrides (`gcloud builds submit` reads the build log from
  `https://storage.googleapis.com/BUCKET/log-ID.txt`) arrive as CONNECT; the stub terminates TLS with a certificate
  from its own throw-away CA, which gcloud trusts through `core/custom_ca_certs_file`.
- no account: a token file (`CLOUDSDK_AUTH_ACCESS_TOKEN_FILE`) and `False` in the config dir's `gce` file, so gcloud
  neither logs in nor probes the metadata server.

What it serves, with real state (names as in the APIs' v1 discovery documents):
- Cloud Run Admin API v1 (Knative style): namespaces.{services,revisions,configurations,routes} and
  projects.locations.services.{getIamPolicy,setIamPolicy,testIamPermissions}, projects.locations.list. Each spec
  change bumps the generation; each template change makes a revision NAME-0000N-abc (or the name gcloud chose);
  status answers Ready at once with url, latestCreated/latestReadyRevisionName and traffic resolved from spec.traffic.
- Cloud Build API v1: projects.(locations.)builds.{create,get,list,cancel}, operations.get; substitutions are checked
  as Cloud Build does (MUST_MATCH unless ALLOW_LOOSE); builds finish SUCCESS at once and write a log object.
- Cloud Storage JSON API: buckets get/insert/list, objects get/list/delete and media/multipart/resumable uploads (the
  source tarball of `gcloud builds submit` lands in `PROJECT_cloudbuild`).

- APIs that other modules plug in with `GcloudStub.plug` (the On-Demand Scanning API: `scanning_stub.py`).
- the project set-up APIs (Resource Manager, Service Usage, Artifact Registry, IAM service accounts and workload
  identity pools, bucket IAM policies) and the "new, empty project" mode: see `gcloud_stub_admin.py`.

Errors are 4xx with Google's JSON error body: on 5xx gcloud retries for about half a minute.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import ssl
import string
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.external import missing_tool
from tests.support.gcloud_stub_admin import DEPLOYER, NEW_PROJECT_SERVICES, SERVICE_IDS, ProjectAdmin

KNATIVE_PREFIX = "apis/serving.knative.dev/v1/"
STUB_DOMAIN = "stub.invalid"
NONCE_LABEL = "client.knative.dev/nonce"
SERVICE_LABEL = "serving.knative.dev/service"
INVOKER_ROLE = "roles/run.invoker"

# APIs plugged in by other modules (GcloudStub.plug): host name part -> routed to CloudState.extensions.
EXTENSION_APIS: set[str] = set()

# Statuses gcloud maps to its HttpXxxError classes; the `status` string is what Google puts in the error body.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
}

# Cloud Build: names a template may use without defining them, and those `--substitutions` may override
# (cloud-build-local validate.go; https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
_BUILTIN_SUBSTITUTIONS = {
    "PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID",
    "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME", "REF_NAME", "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT",
}
_OVERRIDABLE_SUBSTITUTIONS = {"REPO_NAME", "BRANCH_NAME", "TAG_NAME", "REVISION_ID", "COMMIT_SHA", "SHORT_SHA"}
_USER_SUBSTITUTION = re.compile(r"^_[A-Z0-9_]+$")
_TEMPLATE_PARAMETER = re.compile(r"\$(\$|\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")

# The short region codes in *.a.run.app host names.
_REGION_CODES = {
    "us-central1": "uc", "us-east1": "ue", "us-east4": "uk", "us-west1": "uw", "europe-west1": "ew",
    "europe-west4": "ez", "europe-north1": "lz", "asia-northeast1": "an", "asia-east1": "de",
}


class ApiError(Exception):
    """A 4xx answer with Google's JSON error body."""

    def __init__(self, status: int, message: str, google_status: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.google_status = google_status or _GOOGLE_STATUS.get(status, "FAILED_PRECONDITION")

    def body(self) -> dict:
        return {"error": {"code": self.status, "message": self.message, "status": self.google_status}}


@dataclass
class RecordedRequest:
    """One request the stub received; `body` is the parsed JSON body (None when empty or not JSON)."""

    method: str
    url: str
    host: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_body: bytes
    body: Any
    api: str  # the API by host: run | cloudbuild | storage | iam | serviceusage | artifactregistry | ... | other
    status: int = 0  # the stub's answer

    def __repr__(self) -> str:
        return f"<{self.method} {self.url} -> {self.status}>"


@dataclass
class _Failure:
    status: int
    message: str
    matches: Callable[[RecordedRequest], bool]


@dataclass
class GcloudCall:
    """One gcloud run by `GcloudStub.gcloud`, with its wall time."""

    args: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _letters(n: int, rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _is_write(request: RecordedRequest) -> bool:
    """Requests that change state: the default target of `fail_next`."""
    if request.method not in {"POST", "PUT", "PATCH", "DELETE"}:
        return False
    return not request.path.endswith((":testIamPermissions", ":getIamPolicy"))


class CloudState:
    """The fake Cloud Run, Cloud Build and Cloud Storage, kept as the plain dicts the APIs return."""

    def __init__(self, project: str, project_number: str, seed: int = 0):
        self.project = project
        self.project_number = project_number
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.url_hash = hashlib.sha256(project.encode()).hexdigest()[:10]
        # Cloud Run, keyed by (region, name)
        self.services: dict[tuple[str, str], dict] = {}
        self.revisions: dict[tuple[str, str], dict] = {}
        self.iam_policies: dict[tuple[str, str], dict] = {}
        self.config_generation: dict[tuple[str, str], int] = {}
        # Cloud Build, keyed by build id, in creation order
        self.builds: dict[str, dict] = {}
        # Cloud Storage
        self.buckets: dict[str, dict] = {}
        self.objects: dict[tuple[str, str], tuple[dict, bytes]] = {}
        self.resumable_uploads: dict[str, dict] = {}
        # what tests arrange
        self.failures: list[_Failure] = []
        self.revision_failures: list[str] = []
        self.build_outcomes: list[tuple[str, str]] = []
        self.testable_permissions: set[str] | None = None  # None: the caller holds every permission asked for
        self.pending_polls = 0  # next N service reads answer Ready=Unknown
        self.urls: dict[str | None, str] = {}  # traffic tag (None: the service) -> URL to report, e.g. a local service
        # project set-up: APIs, repositories, service accounts, IAM policies, identity pools (gcloud_stub_admin)
        self.admin = ProjectAdmin(project, project_number, ApiError, self._etag)
        self.extensions: dict[str, Callable[[RecordedRequest], Any]] = {}  # api -> handler (GcloudStub.plug)

    # ---- routing -------------------------------------------------------------------------------------------------

    def handle(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            for failure in self.failures:
                if failure.matches(request):
                    self.failures.remove(failure)
                    raise ApiError(failure.status, failure.message)
            self.admin.require_enabled(request.api)
            if request.api == "run":
                return self._json(self._run(request))
            if request.api == "cloudbuild":
                return self._json(self._cloudbuild(request))
            if request.api == "storage":
                return self._storage(request)
            if request.api in self.extensions:
                return self._json(self.extensions[request.api](request))
            if request.api != "other":
                return self._json(self.admin.handle(request.api, request.method, request.path, request.query,
                                                    request.body))
            raise ApiError(404, f"The stub does not serve {request.host} ({request.method} {request.path}).")

    @staticmethod
    def _json(payload: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json; charset=UTF-8"}, json.dumps(payload).encode()

    # ---- Cloud Run -----------------------------------------------------------------------------------------------

    def _run(self, request: RecordedRequest) -> Any:
        region = request.host.split("-run.", 1)[0] if "-run." in request.host else None
        path = request.path.lstrip("/")
        if path.startswith(KNATIVE_PREFIX):
            parts = path[len(KNATIVE_PREFIX):].split("/")
            if len(parts) < 3 or parts[0] != "namespaces":
                raise ApiError(404, f"Unknown path {request.path}")
            self._check_namespace(parts[1])
            return self._knative(request, region, parts[2], parts[3] if len(parts) > 3 else None)
        match = re.fullmatch(r"v1/projects/([^/]+)/locations(?:/([^/]+)(?:/(\w+)(?:/([^/:]+))?)?)?(?::(\w+))?", path)
        if not match:
            raise ApiError(404, f"Unknown path {request.path}")
        project, location, collection, name, verb = match.groups()
        self._check_namespace(project)
        if location is None:
            regions = sorted({"us-central1", "europe-west1", "asia-northeast1"} | {r for r, _ in self.services})
            return {"locations": [{"name": f"projects/{self.project}/locations/{r}", "locationId": r}
                                  for r in regions]}
        if collection == "services" and name and verb:
            return self._iam(request, location, name, verb)
        if collection and region is None:
            region = location
        if collection in {"services", "revisions", "configurations", "routes"}:
            return self._knative(request, region, collection, name)
        raise ApiError(404, f"Unknown path {request.path}")

    def _check_namespace(self, namespace: str) -> None:
        if namespace not in {self.project, self.project_number}:
            raise ApiError(403, f"Permission denied on resource project {namespace}.")

    def _knative(self, request: RecordedRequest, region: str | None, collection: str, name: str | None) -> Any:
        dry_run = request.query.get("dryRun") == "all"
        if collection != "services":
            return self._knative_other(request, region, collection, name, dry_run)
        answer = self._knative_service(request, region, name, dry_run)
        if request.method in {"POST", "PUT"} and self.pending_polls > 0:
            return _not_ready(answer)  # gcloud goes on to poll the service with GETs
        return answer

    def _knative_service(self, request: RecordedRequest, region: str | None, name: str | None, dry_run: bool) -> Any:
        method = request.method
        if name is None and method == "POST":
            return self._create_service(self._need_region(region), request.body, dry_run)
        if name is None and method == "GET":
            return self._list("ServiceList", self._in_regions(self.services, region))
        key = (self._need_region(region), name)
        if method == "GET":
            service = self._get(self.services, key, "Service")
            if self.pending_polls > 0:
                self.pending_polls -= 1
                return _not_ready(service)
            return service
        if method == "PUT":
            return self._replace_service(key, request.body, dry_run)
        if method == "DELETE":
            self._get(self.services, key, "Service")
            if not dry_run:
                self._delete_service(key)
            return {"status": "Success", "details": {"name": name, "kind": "services"}}
        raise ApiError(405, f"{method} is not supported on services")

    def _knative_other(self, request: RecordedRequest, region: str | None, collection: str, name: str | None,
                       dry_run: bool) -> Any:
        method = request.method
        if collection == "revisions":
            if name is None and method == "GET":
                revisions = self._in_regions(self.revisions, region)
                selector = request.query.get("labelSelector")
                if selector:
                    revisions = [r for r in revisions if _selector_matches(selector, r["metadata"].get("labels", {}))]
                return self._list("RevisionList", revisions)
            key = (self._need_region(region), name)
            if method == "GET":
                return self._get(self.revisions, key, "Revision")
            if method == "DELETE":
                revision = self._get(self.revisions, key, "Revision")
                service_key = (key[0], revision["metadata"]["labels"][SERVICE_LABEL])
                if any(t.get("revisionName") == name for t in self.services[service_key]["status"].get("traffic", [])):
                    raise ApiError(400, f"Revision {name} is receiving traffic and cannot be deleted.",
                                   "FAILED_PRECONDITION")
                if not dry_run:
                    del self.revisions[key]
                return {"status": "Success", "details": {"name": name, "kind": "revisions"}}
        if collection in {"configurations", "routes"} and method == "GET":
            make = self._configuration if collection == "configurations" else self._route
            if name is None:
                return self._list("ConfigurationList" if collection == "configurations" else "RouteList",
                                  [make(s) for s in self._in_regions(self.services, region)])
            return make(self._get(self.services, (self._need_region(region), name), collection[:-1].title()))
        raise ApiError(405 if name else 404, f"{method} is not supported on {collection}")

    @staticmethod
    def _need_region(region: str | None) -> str:
        if not region:
            raise ApiError(400, "A region is required: call the regional endpoint REGION-run.googleapis.com.")
        return region

    @staticmethod
    def _in_regions(table: dict[tuple[str, str], dict], region: str | None) -> list[dict]:
        return [copy.deepcopy(v) for (r, _), v in table.items() if region in {None, "-"} or r == region]

    @staticmethod
    def _get(table: dict, key: tuple[str, str], kind: str) -> dict:
        if key not in table:
            raise ApiError(404, f"{kind} [{key[1]}] could not be found.")
        return copy.deepcopy(table[key])

    def _list(self, kind: str, items: list[dict]) -> dict:
        return {"apiVersion": "serving.knative.dev/v1", "kind": kind, "metadata": {}, "items": items}

    def _service_url(self, region: str, name: str, tag: str | None = None) -> str:
        if tag in self.urls:
            return self.urls[tag]
        prefix = f"{tag}---" if tag else ""
        return f"https://{prefix}{name}-{self.url_hash}-{_REGION_CODES.get(region, 'uc')}.a.run.app"

    def _validate_service(self, body: Any, name: str | None = None) -> dict:
        if not isinstance(body, dict) or body.get("kind", "Service") != "Service":
            raise ApiError(400, "The request body must be a serving.knative.dev/v1 Service.")
        service = copy.deepcopy(body)
        metadata = service.setdefault("metadata", {})
        if name is not None and metadata.get("name") != name:
            raise ApiError(400, f"metadata.name {metadata.get('name')!r} does not match the service {name!r}.")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,47}[a-z0-9])?", metadata.get("name") or ""):
            raise ApiError(400, f"metadata.name: invalid service name {metadata.get('name')!r}: lowercase letters, "
                                "digits and hyphens, starting with a letter, at most 49 characters.")
        template = service.setdefault("spec", {}).setdefault("template", {})
        containers = template.setdefault("spec", {}).get("containers") or []
        if not containers or not all(c.get("image") for c in containers):
            raise ApiError(400, "spec.template.spec.containers[0].image: Required field is not set.")
        for container in containers:
            ports = container.get("ports") or []
            if len(containers) == 1 and not ports:
                container["ports"] = [{"name": "http1", "containerPort": 8080}]
            for port in container.get("ports") or []:
                port.setdefault("name", "http1")
            if not container.get("resources", {}).get("limits"):
                container.setdefault("resources", {})["limits"] = {"cpu": "1000m", "memory": "512Mi"}
            if container.get("ports") and "startupProbe" not in container:
                # Cloud Run configures a TCP startup probe when none is given.
                port = container["ports"][0].get("containerPort", 8080)
                container["startupProbe"] = {"timeoutSeconds": 240, "periodSeconds": 240, "failureThreshold": 1,
                                             "tcpSocket": {"port": port}}
        spec = template["spec"]
        spec.setdefault("containerConcurrency", 80)
        spec.setdefault("timeoutSeconds", 300)
        spec.setdefault("serviceAccountName", f"{self.project_number}-compute@developer.gserviceaccount.com")
        self.admin.require_runtime_account(spec["serviceAccountName"])
        if not 1 <= int(spec["timeoutSeconds"]) <= 3600:
            raise ApiError(400, "spec.template.spec.timeoutSeconds: must be between 1 and 3600.")
        if not 0 <= int(spec["containerConcurrency"]) <= 1000:
            raise ApiError(400, "spec.template.spec.containerConcurrency: must be between 0 and 1000.")
        return service

    def _create_service(self, region: str, body: Any, dry_run: bool) -> dict:
        service = self._validate_service(body)
        name = service["metadata"]["name"]
        key = (region, name)
        if key in self.services:
            raise ApiError(409, f"Resource '{name}' already exists.")
        metadata = service["metadata"]
        metadata.update(
            namespace=self.project_number,
            selfLink=f"/{KNATIVE_PREFIX}namespaces/{self.project_number}/services/{name}",
            uid=str(uuid.UUID(int=self.rng.getrandbits(128))),
            generation=1,
            creationTimestamp=_now(),
        )
        metadata.setdefault("labels", {})["cloud.googleapis.com/location"] = region
        annotations = metadata.setdefault("annotations", {})
        annotations.setdefault("run.googleapis.com/ingress", "all")
        annotations["run.googleapis.com/ingress-status"] = annotations["run.googleapis.com/ingress"]
        annotations["serving.knative.dev/creator"] = "stub-user@example.com"
        annotations["serving.knative.dev/lastModifier"] = "stub-user@example.com"
        annotations["run.googleapis.com/urls"] = json.dumps(
            [f"https://{name}-{self.project_number}.{region}.run.app", self._service_url(region, name)])
        if not service["spec"].get("traffic"):
            service["spec"]["traffic"] = [{"percent": 100, "latestRevision": True}]
        service["status"] = {}
        if dry_run:
            return service
        with self._transaction():
            self.services[key] = service
            self.iam_policies[key] = {"version": 1, "etag": self._etag(), "bindings": []}
            self._reconcile(key, previous_template=None)
        return copy.deepcopy(self.services[key])

    def _replace_service(self, key: tuple[str, str], body: Any, dry_run: bool) -> dict:
        current = self._get(self.services, key, "Service")
        service = self._validate_service(body, name=key[1])
        sent_version = service["metadata"].get("resourceVersion")
        if sent_version and sent_version != current["metadata"]["resourceVersion"]:
            raise ApiError(409, f"Conflict for resource '{key[1]}': version '{sent_version}' was specified but "
                                f"current version is '{current['metadata']['resourceVersion']}'.", "ABORTED")
        if not service["spec"].get("traffic"):
            service["spec"]["traffic"] = [{"percent": 100, "latestRevision": True}]
        metadata = current["metadata"]
        # Clients may change labels and annotations; the server keeps the rest of its metadata.
        metadata["labels"] = {**service["metadata"].get("labels", {}), "cloud.googleapis.com/location": key[0]}
        kept = {k: v for k, v in metadata.get("annotations", {}).items() if k.startswith("serving.knative.dev/")
                or k in {"run.googleapis.com/urls", "run.googleapis.com/ingress-status"}}
        metadata["annotations"] = {**service["metadata"].get("annotations", {}), **kept}
        metadata["annotations"]["run.googleapis.com/ingress-status"] = metadata["annotations"].get(
            "run.googleapis.com/ingress", "all")
        spec_changed = _canonical(service["spec"]) != _canonical(current["spec"])
        if spec_changed:
            metadata["generation"] += 1
        updated = {**current, "metadata": metadata, "spec": service["spec"]}
        if dry_run:
            return updated
        with self._transaction():
            previous = self.services[key]
            self.services[key] = updated
            self._reconcile(key, previous_template=previous["spec"]["template"])
        return copy.deepcopy(self.services[key])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A rejected write leaves services, revisions and policies as they were."""
        saved = [dict(t) for t in (self.services, self.revisions, self.iam_policies, self.config_generation)]
        try:
            yield
        except ApiError:
            for table, before in zip((self.services, self.revisions, self.iam_policies, self.config_generation),
                                     saved):
                table.clear()
                table.update(before)
            raise

    def _delete_service(self, key: tuple[str, str]) -> None:
        self.services.pop(key, None)
        self.iam_policies.pop(key, None)
        self.config_generation.pop(key, None)
        for revision_key in [k for k, r in self.revisions.items()
                             if k[0] == key[0] and r["metadata"]["labels"].get(SERVICE_LABEL) == key[1]]:
            del self.revisions[revision_key]

    def _reconcile(self, key: tuple[str, str], previous_template: dict | None) -> None:
        """Make the revision a template change asks for, then resolve traffic and status (Ready at once)."""
        region, name = key
        service = self.services[key]
        template = service["spec"]["template"]
        status = service["status"]
        requested_name = (template.get("metadata") or {}).get("name")
        if requested_name:
            existing = self.revisions.get((region, requested_name))
            if existing is not None:
                if _canonical(existing["spec"]) != _canonical(template.get("spec")):
                    raise ApiError(409, f"Revision named '{requested_name}' with different configuration "
                                        "already exists.")
            else:
                if not requested_name.startswith(f"{name}-"):
                    raise ApiError(400, f"spec.template.metadata.name: revision name {requested_name!r} must be "
                                        f"prefixed by the service name '{name}-'.")
                self._new_revision(key, requested_name)
        elif previous_template is None or _canonical(template) != _canonical(previous_template):
            generation = self.config_generation.get(key, 0) + 1
            self._new_revision(key, f"{name}-{generation:05d}-{_letters(3, self.rng)}")
        self._resolve_traffic(key)
        service["metadata"]["resourceVersion"] = self._etag()
        status["observedGeneration"] = service["metadata"]["generation"]
        status["url"] = self._service_url(region, name)
        status["address"] = {"url": status["url"]}

    def _new_revision(self, key: tuple[str, str], revision_name: str) -> None:
        region, name = key
        service = self.services[key]
        template = copy.deepcopy(service["spec"]["template"])
        generation = self.config_generation.get(key, 0) + 1
        self.config_generation[key] = generation
        template_meta = template.get("metadata") or {}
        image = template["spec"]["containers"][0]["image"]
        digest = image if "@sha256:" in image else (
            image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        ) + "@sha256:" + hashlib.sha256(image.encode()).hexdigest()
        failure = self.revision_failures.pop(0) if self.revision_failures else None
        now = _now()
        if failure is None:
            conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                          for t in ("Ready", "Active", "ContainerHealthy", "ResourcesAvailable")]
        else:
            conditions = [
                {"type": "Ready", "status": "False", "reason": "HealthCheckContainerError", "message": failure,
                 "lastTransitionTime": now},
                {"type": "ContainerHealthy", "status": "False", "reason": "HealthCheckContainerError",
                 "message": failure, "lastTransitionTime": now},
            ]
        labels = {
            **template_meta.get("labels", {}),
            SERVICE_LABEL: name,
            "serving.knative.dev/configuration": name,
            "serving.knative.dev/configurationGeneration": str(generation),
            "serving.knative.dev/serviceUid": service["metadata"]["uid"],
            "cloud.googleapis.com/location": region,
        }
        revision = {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Revision",
            "metadata": {
                "name": revision_name,
                "namespace": self.project_number,
                "selfLink": f"/{KNATIVE_PREFIX}namespaces/{self.project_number}/revisions/{revision_name}",
                "uid": str(uuid.UUID(int=self.rng.getrandbits(128))),
                "resourceVersion": self._etag(),
                "generation": 1,
                "creationTimestamp": now,
                "labels": labels,
                "annotations": {**template_meta.get("annotations", {}),
                                "serving.knative.dev/creator": "stub-user@example.com"},
                "ownerReferences": [{"kind": "Configuration", "name": name, "uid": service["metadata"]["uid"],
                                     "apiVersion": "serving.knative.dev/v1", "controller": True,
                                     "blockOwnerDeletion": True}],
            },
            "spec": template["spec"],
            "status": {
                "observedGeneration": 1,
                "conditions": conditions,
                "logUrl": f"https://console.cloud.google.com/logs/viewer?project={self.project}"
                          f"&resource=cloud_run_revision/service_name/{name}/revision_name/{revision_name}",
                "imageDigest": digest,
                "serviceName": name,
            },
        }
        self.revisions[(region, revision_name)] = revision
        status = service["status"]
        status["latestCreatedRevisionName"] = revision_name
        if failure is None:
            status["latestReadyRevisionName"] = revision_name
            status["conditions"] = [{"type": t, "status": "True", "lastTransitionTime": now}
                                    for t in ("Ready", "ConfigurationsReady", "RoutesReady")]
        else:
            message = f"Revision '{revision_name}' is not ready and cannot serve traffic. {failure}"
            status["conditions"] = [
                {"type": "Ready", "status": "False", "reason": "HealthCheckContainerError", "message": message,
                 "lastTransitionTime": now},
                {"type": "ConfigurationsReady", "status": "False", "reason": "HealthCheckContainerError",
                 "message": message, "lastTransitionTime": now},
                {"type": "RoutesReady", "status": "True", "lastTransitionTime": now},
            ]

    def _resolve_traffic(self, key: tuple[str, str]) -> None:
        region, name = key
        service = self.services[key]
        status = service["status"]
        targets = service["spec"]["traffic"]
        total, tags, resolved = 0, set(), []
        for target in targets:
            percent = int(target.get("percent") or 0)
            total += percent
            latest = bool(target.get("latestRevision"))
            revision_name = target.get("revisionName")
            if latest == bool(revision_name):
                raise ApiError(400, "spec.traffic: each target names exactly one of revisionName or "
                                    "latestRevision: true.")
            if revision_name and (region, revision_name) not in self.revisions:
                raise ApiError(400, f"spec.traffic: Revision '{revision_name}' referenced in traffic not found.")
            if revision_name and self.revisions[(region, revision_name)]["metadata"]["labels"][SERVICE_LABEL] != name:
                raise ApiError(400, f"spec.traffic: Revision '{revision_name}' belongs to another service.")
            tag = target.get("tag")
            if tag:
                if tag in tags:
                    raise ApiError(400, f"spec.traffic: tag '{tag}' is used more than once.")
                if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", tag):
                    raise ApiError(400, f"spec.traffic: invalid tag {tag!r}: lowercase letters, digits and hyphens.")
                tags.add(tag)
            entry = {}
            if latest:
                if not status.get("latestReadyRevisionName"):
                    continue  # nothing ready yet: Cloud Run leaves it out of status
                entry["revisionName"] = status["latestReadyRevisionName"]
                entry["latestRevision"] = True
            else:
                entry["revisionName"] = revision_name
            if percent:
                entry["percent"] = percent
            if tag:
                entry["tag"] = tag
                entry["url"] = self._service_url(region, name, tag)
            resolved.append(entry)
        if total != 100:
            raise ApiError(400, f"spec.traffic: traffic targets sum to {total}%, want 100%.")
        status["traffic"] = resolved

    def _configuration(self, service: dict) -> dict:
        return _view_of(service, "Configuration", {"template": service["spec"]["template"]},
                        {"observedGeneration", "conditions", "latestCreatedRevisionName", "latestReadyRevisionName"})

    def _route(self, service: dict) -> dict:
        return _view_of(service, "Route", {"traffic": service["spec"]["traffic"]},
                        {"observedGeneration", "conditions", "traffic", "url", "address"})

    def _iam(self, request: RecordedRequest, region: str, name: str, verb: str) -> dict:
        key = (region, name)
        if verb == "testIamPermissions":  # answered from project-level roles: the service need not exist yet
            asked = (request.body or {}).get("permissions", [])
            held = asked if self.testable_permissions is None else [p for p in asked if p in self.testable_permissions]
            return {"permissions": held} if held else {}
        if key not in self.services:
            raise ApiError(404, f"Resource 'projects/{self.project}/locations/{region}/services/{name}' was not found")
        if verb == "getIamPolicy":
            return copy.deepcopy(self.iam_policies[key])
        if verb == "setIamPolicy":
            policy = copy.deepcopy((request.body or {}).get("policy") or {})
            if policy.get("etag") and policy["etag"] != self.iam_policies[key]["etag"]:
                raise ApiError(409, "There were concurrent policy changes. Please retry the whole "
                                    "read-modify-write with exponential backoff.", "ABORTED")
            policy["etag"] = self._etag()
            policy.setdefault("version", 1)
            self.iam_policies[key] = policy
            return copy.deepcopy(policy)
        raise ApiError(404, f"Unknown method {verb}")

    def _etag(self) -> str:
        # URL-safe: gcloud (apitools) reads an etag as bytes and sends it back in that alphabet
        return base64.urlsafe_b64encode(self.rng.getrandbits(64).to_bytes(8, "big")).decode()

    # ---- Cloud Build ---------------------------------------------------------------------------------------------

    def _cloudbuild(self, request: RecordedRequest) -> Any:
        path = request.path.lstrip("/")
        match = re.fullmatch(r"v1/projects/([^/]+)(?:/locations/([^/]+))?/(builds|operations)(?:/([^/:]+))?"
                             r"(?::(\w+))?", path)
        if not match:
            match = re.fullmatch(r"v1/(operations)/build/([^/]+)/([^/:]+)", path)
            if match:
                return self._build_operation(match.group(3))
            raise ApiError(404, f"Unknown path {request.path}")
        project, location, collection, ident, verb = match.groups()
        self._check_namespace(project)
        location = location or "global"
        if collection == "operations":
            if request.method == "GET" and ident:
                return self._build_operation(ident)
            raise ApiError(404, f"Unknown path {request.path}")
        if ident is None and request.method == "POST":
            return self._create_build(location, request.body)
        if ident is None and request.method == "GET":
            return {"builds": [copy.deepcopy(b) for b in reversed(self.builds.values())
                               if b["name"].split("/")[3] == location]}
        if ident not in self.builds:
            raise ApiError(404, f"Build {ident} not found")
        build = self.builds[ident]
        if verb == "cancel" and request.method == "POST":
            if build["status"] in {"QUEUED", "WORKING"}:
                build["status"] = "CANCELLED"
            return copy.deepcopy(build)
        if request.method == "GET" and verb is None:
            self._finish_build(build)
            return copy.deepcopy(build)
        raise ApiError(404, f"Unknown path {request.path}")

    def _create_build(self, location: str, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid build: no build field was provided")
        build = copy.deepcopy(body)
        _check_build(build)
        build_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        options = build.get("options") or {}
        build.update(
            id=build_id,
            name=f"projects/{self.project_number}/locations/{location}/builds/{build_id}",
            projectId=self.project,
            status="QUEUED",
            createTime=_now(),
            logUrl=f"https://console.cloud.google.com/cloud-build/builds;region={location}/{build_id}"
                   f"?project={self.project_number}",
        )
        build.setdefault("timeout", "3600s")  # "Default time is 60 minutes" (Build.timeout)
        build.setdefault("queueTtl", "3600s")
        if options.get("logging") not in {"CLOUD_LOGGING_ONLY", "STACKDRIVER_ONLY", "NONE"}:
            build.setdefault("logsBucket", f"gs://{self.project_number}.cloudbuild-logs.googleusercontent.com")
        self.builds[build_id] = build
        return {
            "name": f"projects/{self.project_number}/locations/{location}/operations/{build_id}",
            "metadata": {"@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                         "build": copy.deepcopy(build)},
        }

    def _finish_build(self, build: dict) -> None:
        if build["status"] != "QUEUED":
            return
        outcome, detail = self.build_outcomes.pop(0) if self.build_outcomes else ("SUCCESS", "")
        substitutions = {"PROJECT_ID": self.project, "PROJECT_NUMBER": self.project_number, "BUILD_ID": build["id"],
                         "LOCATION": build["name"].split("/")[3], **(build.get("substitutions") or {})}
        for image in build.get("images", []):
            try:
                self.admin.require_repository(_substitute(image, substitutions))
            except ApiError as error:
                outcome, detail = "FAILURE", f"pushing {_substitute(image, substitutions)}: {error.message}"
        now = _now()
        build["startTime"] = build["finishTime"] = now
        build["status"] = outcome
        lines = [f'starting build "{build["id"]}"', "", "FETCHSOURCE"]
        for index, step in enumerate(build.get("steps", [])):
            step["status"] = "SUCCESS" if outcome == "SUCCESS" or index < len(build["steps"]) - 1 else outcome
            step["timing"] = {"startTime": now, "endTime": now}
            args = [_substitute(a, substitutions) for a in step.get("args", [])]
            label = f"Step #{index}" + (f' - "{step["id"]}"' if step.get("id") else "")
            lines.append(f"{label}: {_substitute(step['name'], substitutions)} {' '.join(args)}".rstrip())
        if outcome == "SUCCESS":
            images = [_substitute(i, substitutions) for i in build.get("images", [])]
            if images:
                build["results"] = {"images": [
                    {"name": i, "digest": "sha256:" + hashlib.sha256(i.encode()).hexdigest()} for i in images]}
            lines += ["PUSH", *(f"Pushing {i}" for i in images), "DONE"]
        else:
            build["failureInfo"] = {"type": "USER_BUILD_STEP", "detail": detail}
            lines += [f"ERROR: {detail}"]
        bucket_url = build.get("logsBucket")
        if bucket_url:
            bucket, _, prefix = bucket_url[len("gs://"):].partition("/")
            obj = (prefix.rstrip("/") + "/" if prefix else "") + f"log-{build['id']}.txt"
            self._put_object(bucket, obj, ("\n".join(lines) + "\n").encode(), "text/plain")

    def _build_operation(self, build_id: str) -> dict:
        if build_id not in self.builds:
            raise ApiError(404, f"Operation for build {build_id} not found")
        build = self.builds[build_id]
        self._finish_build(build)
        location = build["name"].split("/")[3]
        return {
            "name": f"projects/{self.project_number}/locations/{location}/operations/{build_id}",
            "metadata": {"@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                         "build": copy.deepcopy(build)},
            "done": True,
            "response": {"@type": "type.googleapis.com/google.devtools.cloudbuild.v1.Build", **copy.deepcopy(build)},
        }

    # ---- Cloud Storage -------------------------------------------------------------------------------------------

    def _storage(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        path = request.path
        for upload_prefix in ("/upload/storage/v1/b/", "/resumable/upload/storage/v1/b/"):  # apitools uses both
            if path.startswith(upload_prefix):
                return self._upload(request, urllib.parse.unquote(path[len(upload_prefix):].split("/", 1)[0]))
        if path.startswith("/storage/v1/b"):
            rest = path[len("/storage/v1/b"):]
            if rest in {"", "/"}:
                if request.method == "POST":
                    return self._json(self._insert_bucket(request.body or {}))
                prefix = request.query.get("prefix", "")
                return self._json({"kind": "storage#buckets",
                                   "items": [b for n, b in sorted(self.buckets.items()) if n.startswith(prefix)]})
            parts = rest[1:].split("/", 2)  # BUCKET | BUCKET/o | BUCKET/o/OBJECT (the object name is %-encoded)
            bucket = urllib.parse.unquote(parts[0])
            if len(parts) == 2 and parts[1] == "iam" and request.method in {"GET", "PUT"}:
                if bucket not in self.buckets:
                    raise ApiError(404, "The specified bucket does not exist.")
                policy = self.admin.policy(f"bucket/{bucket}", request.body if request.method == "PUT" else None)
                return self._json({"kind": "storage#policy", "resourceId": f"projects/_/buckets/{bucket}", **policy})
            if len(parts) == 1:
                if request.method == "GET":
                    if bucket not in self.buckets:
                        raise ApiError(404, "The specified bucket does not exist.")
                    return self._json(self.buckets[bucket])
                raise ApiError(405, f"{request.method} on a bucket is not supported by the stub")
            if parts[1] != "o":
                raise ApiError(404, f"Unknown path {request.path}")
            if len(parts) == 2 or not parts[2]:
                prefix = request.query.get("prefix", "")
                items = [m for (b, n), (m, _) in sorted(self.objects.items()) if b == bucket and n.startswith(prefix)]
                return self._json({"kind": "storage#objects", "items": items})
            return self._object(request, bucket, urllib.parse.unquote(parts[2]),
                                media=request.query.get("alt") == "media")
        # storage.googleapis.com/BUCKET/OBJECT: how gcloud reads build logs
        bucket, _, name = path.lstrip("/").partition("/")
        return self._object(request, urllib.parse.unquote(bucket), urllib.parse.unquote(name), media=True)

    def _insert_bucket(self, body: dict) -> dict:
        name = body.get("name", "")
        if name in self.buckets:
            raise ApiError(409, "Your previous request to create the named bucket succeeded and you already own it.")
        if not re.fullmatch(r"[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9]", name):
            raise ApiError(400, f"Invalid bucket name: '{name}'")
        self.buckets[name] = {
            "kind": "storage#bucket", "id": name, "name": name, "selfLink": f"/storage/v1/b/{name}",
            "projectNumber": self.project_number, "metageneration": "1", "location": body.get("location") or "US",
            "storageClass": "STANDARD", "etag": "CAE=", "timeCreated": _now(), "updated": _now(),
            "locationType": "multi-region",
        }
        return copy.deepcopy(self.buckets[name])

    def _put_object(self, bucket: str, name: str, data: bytes, content_type: str) -> dict:
        generation = str(time.time_ns() // 1000)
        meta = {
            "kind": "storage#object", "id": f"{bucket}/{name}/{generation}", "name": name, "bucket": bucket,
            "generation": generation, "metageneration": "1", "contentType": content_type or "application/octet-stream",
            "size": str(len(data)), "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "crc32c": _crc32c_b64(data), "etag": "CAE=", "timeCreated": _now(), "updated": _now(),
            "storageClass": "STANDARD", "selfLink": f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}",
            "mediaLink": f"/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
                         f"?generation={generation}&alt=media",
        }
        self.objects[(bucket, name)] = (meta, data)
        return copy.deepcopy(meta)

    def _object(self, request: RecordedRequest, bucket: str, name: str, media: bool):
        if request.method == "DELETE":
            if self.objects.pop((bucket, name), None) is None:
                raise ApiError(404, f"No such object: {bucket}/{name}")
            return 204, {}, b""
        if (bucket, name) not in self.objects:
            raise ApiError(404, f"No such object: {bucket}/{name}")
        meta, data = self.objects[(bucket, name)]
        if not media:
            return self._json(meta)
        headers = {"Content-Type": meta["contentType"]}
        wanted = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
        if wanted:
            start = int(wanted.group(1))
            if start >= len(data):
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, headers, data[start:]
        return 200, headers, data

    def _upload(self, request: RecordedRequest, bucket: str):
        if bucket not in self.buckets:
            raise ApiError(404, "The specified bucket does not exist.")
        kind = request.query.get("uploadType", "media")
        if kind == "resumable":
            upload_id = request.query.get("upload_id")
            if upload_id is None:  # start the session
                meta = request.body if isinstance(request.body, dict) else {}
                upload_id = uuid.UUID(int=self.rng.getrandbits(128)).hex
                self.resumable_uploads[upload_id] = {
                    "name": meta.get("name") or request.query.get("name"),
                    "contentType": request.headers.get("x-upload-content-type", meta.get("contentType", "")),
                    "data": b"",
                }
                location = (f"{request.url.split('/', 3)[0]}//{request.host}{request.path}?uploadType=resumable"
                            f"&upload_id={upload_id}")
                return 200, {"Location": location, "Content-Length": "0"}, b""
            session = self.resumable_uploads.get(upload_id)
            if session is None:
                raise ApiError(404, f"No upload session {upload_id}")
            session["data"] += request.raw_body
            content_range = request.headers.get("content-range", "")
            total = content_range.rsplit("/", 1)[-1] if "/" in content_range else str(len(session["data"]))
            if total == "*" or int(total) > len(session["data"]):
                return 308, {"Range": f"bytes=0-{len(session['data']) - 1}"}, b""
            del self.resumable_uploads[upload_id]
            return self._json(self._put_object(bucket, session["name"], session["data"], session["contentType"]))
        if kind == "multipart":
            meta, data, content_type = _split_multipart(request)
            return self._json(self._put_object(bucket, meta.get("name") or request.query.get("name"), data,
                                               meta.get("contentType") or content_type))
        return self._json(self._put_object(bucket, request.query.get("name"), request.raw_body,
                                           request.headers.get("content-type", "")))


def _view_of(service: dict, kind: str, spec: dict, status_keys: set[str]) -> dict:
    """The Configuration or Route that Knative derives from a Service: its metadata, part of its spec and status."""
    metadata = copy.deepcopy(service["metadata"])
    metadata["selfLink"] = metadata["selfLink"].replace("/services/", f"/{kind.lower()}s/")
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": kind,
        "metadata": metadata,
        "spec": copy.deepcopy(spec),
        "status": {k: copy.deepcopy(v) for k, v in service["status"].items() if k in status_keys},
    }


def _not_ready(service: dict) -> dict:
    """The service as Cloud Run shows it while the revision is still starting."""
    service = copy.deepcopy(service)
    for condition in service.get("status", {}).get("conditions", []):
        condition.update(status="Unknown", message="Deploying revision.")
        condition.pop("reason", None)
    return service


def _crc32c_b64(data: bytes) -> str:
    try:
        import google_crc32c
    except ImportError:  # optional: gcloud does not check it on upload
        return ""
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _split_multipart(request: RecordedRequest) -> tuple[dict, bytes, str]:
    content_type = request.headers.get("content-type", "")
    # apitools quotes the boundary with single quotes: boundary='===============0540937595166413389=='
    found = re.search(r"""boundary=(?:"([^"]+)"|'([^']+)'|([^;\s]+))""", content_type)
    if not found:
        raise ApiError(400, "multipart upload without a boundary")
    boundary = next(g for g in found.groups() if g)
    meta, data, media_type = {}, b"", ""
    # apitools writes the parts with bare LF line ends; other clients use CRLF
    for part in request.raw_body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part[1:] if part.startswith(b"\n") else part
        head, _, payload = re.split(rb"(\r?\n\r?\n)", part, maxsplit=1) if re.search(rb"\r?\n\r?\n", part) \
            else (part, b"", b"")
        payload = payload[:-2] if payload.endswith(b"\r\n") else payload[:-1] if payload.endswith(b"\n") else payload
        part_type = re.search(rb"(?im)^content-type:\s*([^\r\n]+)", head)
        part_type = part_type.group(1).decode() if part_type else ""
        if not meta and part_type.startswith("application/json"):
            meta = json.loads(payload)
        else:
            data, media_type = payload, part_type
    return meta, data, media_type


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes equality and set-based label selectors: `k = v`, `k==v`, `k!=v`, `k in (a, b)`."""
    for clause in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        clause = clause.strip()
        if not clause:
            continue
        in_match = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", clause)
        if in_match:
            key, op, values = in_match.groups()
            wanted = {v.strip() for v in values.split(",")}
            if (labels.get(key) in wanted) != (op == "in"):
                return False
            continue
        eq = re.fullmatch(r"(\S+?)\s*(!=|==|=)\s*(\S*)", clause)
        if eq is None:
            if clause not in labels:
                return False
            continue
        key, op, value = eq.groups()
        if (labels.get(key) == value) != (op != "!="):
            return False
    return True


def _template_parameters(text: str) -> list[str]:
    return [m.group(2) or m.group(3) for m in _TEMPLATE_PARAMETER.finditer(text or "") if m.group(1) != "$"]


def _substitute(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        if m.group(1) == "$":
            return "$"
        return values.get(m.group(2) or m.group(3), "")

    return _TEMPLATE_PARAMETER.sub(one, text or "")


def _check_build(build: dict) -> None:
    """Cloud Build's request checks (cloud-build-local validate.go mirrors them), answered as 400 like the API."""
    steps = build.get("steps") or []
    if not steps:
        raise ApiError(400, "invalid build: no build steps are specified")
    known = {"-"}
    for index, step in enumerate(steps):
        if not step.get("name"):
            raise ApiError(400, f"invalid build: build step {index} must specify name")
        for dependency in step.get("waitFor", []):
            if dependency not in known:
                raise ApiError(400, f'invalid build: build step #{index} - "{step.get("id", "")}" depends on '
                                    f'"{dependency}", which has not been defined')
        if step.get("id"):
            if step["id"] in known:
                raise ApiError(400, f'invalid build: build step #{index} - "{step["id"]}": the ID is not unique')
            known.add(step["id"])
    substitutions = build.get("substitutions") or {}
    for key in substitutions:
        if not _USER_SUBSTITUTION.match(key) and key not in _OVERRIDABLE_SUBSTITUTIONS:
            raise ApiError(400, f'invalid build: invalid .substitutions field: substitution key "{key}" does not '
                                f'respect format "^_[A-Z0-9_]+$" and is not an overridable built-in substitutions')
    texts = [build.get("logsBucket", ""), *build.get("images", []), *build.get("tags", [])]
    for step in steps:
        texts += [step.get("name", ""), *step.get("args", []), *step.get("env", []), step.get("dir", ""),
                  step.get("entrypoint", ""), step.get("script", "")]
    objects = (build.get("artifacts") or {}).get("objects") or {}
    texts += [objects.get("location", ""), *objects.get("paths", [])]
    used, problems = set(), []
    for text in texts:
        for key in _template_parameters(text):
            used.add(key)
            if key in substitutions or key in _BUILTIN_SUBSTITUTIONS:
                continue
            if _USER_SUBSTITUTION.match(key):
                problems.append(f'key in the template "{key}" is not matched in the substitution data; '
                                f"substitutions = {substitutions}")
            else:
                raise ApiError(400, f"generic::invalid_argument: invalid value for 'build.substitutions': key in "
                                    f'the template "{key}" is not a valid built-in substitution')
    problems += [f'key "{k}" in the substitution data is not matched in the template'
                 for k in sorted(substitutions) if k not in used]
    loose = (build.get("options") or {}).get("substitutionOption") == "ALLOW_LOOSE"
    if problems and not loose:
        raise ApiError(400, "generic::invalid_argument: " + ";".join(problems))


# ---- TLS for the CONNECT tunnels -----------------------------------------------------------------------------------


def _make_tls(directory: Path) -> tuple[Path, ssl.SSLContext] | None:
    """A throw-away CA (its PEM is what gcloud trusts) and a server certificate for *.googleapis.com."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(hours=1), not_valid_after=now + datetime.timedelta(days=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcloud stub test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = ["storage.googleapis.com", "www.googleapis.com", "*.googleapis.com", f"*.{STUB_DOMAIN}", "*.a.run.app"]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storage.googleapis.com")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "stub-ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain_path, key_path = directory / "stub-server.pem", directory / "stub-server.key"
    chain_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain_path, key_path)
    return ca_path, context


# ---- HTTP front: an HTTP proxy that answers every request itself ---------------------------------------------------


def _api_of(host: str, path: str) -> str:
    """Which fake answers: by the host's service part, after the region gcloud may put in front (REGION-run)."""
    name = host.split(":", 1)[0]
    for suffix in (f".{STUB_DOMAIN}", ".googleapis.com"):
        if name.endswith(suffix):
            service = name[: -len(suffix)].rsplit("-", 1)[-1]
            if service in {"run", "cloudbuild", "storage", *SERVICE_IDS, *EXTENSION_APIS}:
                return service
            if service == "www" and path.startswith(("/storage/v1/", "/upload/storage/v1/", "/resumable/upload/")):
                return "storage"
    return "other"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"
    tunnel_host: str | None = None

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read stub.requests instead
        pass

    def do_CONNECT(self) -> None:
        stub = self.server.stub
        stub._record_connect(self.path)
        if stub._tls is None:
            self.send_error(501, "the stub has no TLS (cryptography is missing)")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        try:
            tls = stub._tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            self.close_connection = True
            return
        self.connection = tls
        self.rfile = tls.makefile("rb")
        self.wfile = tls.makefile("wb")
        self.tunnel_host = self.path.rsplit(":", 1)[0]
        self.close_connection = False

    def _any(self) -> None:
        stub = self.server.stub
        raw = self._read_body()
        if self.path.startswith(("http://", "https://")):
            url = urllib.parse.urlsplit(self.path)
            host, path, query_string = url.netloc, url.path, url.query
            full = self.path
        else:
            host = self.tunnel_host or self.headers.get("Host", "")
            path, _, query_string = self.path.partition("?")
            full = f"{'https' if self.tunnel_host else 'http'}://{host}{self.path}"
        query = dict(urllib.parse.parse_qsl(query_string, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = json.loads(raw) if raw and "json" in headers.get("content-type", "json") else None
        except ValueError:
            body = None
        request = RecordedRequest(self.command, full, host.split(":")[0], path, query, headers, raw, body,
                                  _api_of(host, path))
        stub._record(request)
        try:
            status, out_headers, payload = stub.state.handle(request)
        except ApiError as error:
            status, out_headers, payload = error.status, {"Content-Type": "application/json; charset=UTF-8"}, \
                json.dumps(error.body()).encode()
        except Exception as error:  # a stub bug: answer 400 so that gcloud fails fast instead of retrying 5xx
            status, out_headers = 400, {"Content-Type": "application/json; charset=UTF-8"}
            payload = json.dumps(ApiError(400, f"gcloud stub failure: {error!r}").body()).encode()
            stub.errors.append(error)
        request.status = status
        self.send_response(status)
        for name, value in out_headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    stub: "GcloudStub"


# ---- the object tests use --------------------------------------------------------------------------------------------


class GcloudStub:
    """A running stub: `env` runs the real gcloud against it; the rest reads or arranges its state."""

    ENDPOINTS = {
        "RUN": "run", "CLOUDBUILD": "cloudbuild", "STORAGE": "storage", "IAM": "iam",
        "ARTIFACTREGISTRY": "artifactregistry", "SERVICEUSAGE": "serviceusage",
        "CLOUDRESOURCEMANAGER": "cloudresourcemanager", "LOGGING": "logging", "IAMCREDENTIALS": "iamcredentials",
        "SECRETMANAGER": "secretmanager", "COMPUTE": "compute",
    }

    def __init__(self, workdir: Path, project: str = "stub-project", project_number: str = "123456789012",
                 region: str = "us-central1"):
        self.workdir = Path(workdir)
        self.project = project
        self.project_number = project_number
        self.region = region
        self.state = CloudState(project, project_number)
        self.requests: list[RecordedRequest] = []
        self.connects: list[str] = []
        self.errors: list[Exception] = []
        self.calls: list[GcloudCall] = []
        self._tls: ssl.SSLContext | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.env: dict[str, str] = {}

    # lifecycle

    def start(self) -> "GcloudStub":
        config = self.workdir / "gcloud-config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "gce").write_text("False")  # not on GCE: skip the metadata-server probe
        token = self.workdir / "access-token"
        token.write_text("stub-access-token")
        tls = _make_tls(self.workdir)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="gcloud-stub", daemon=True)
        self._thread.start()
        # The developer's own gcloud settings must not leak in (only the choice of Python for gcloud may).
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("CLOUDSDK_") and not k.startswith(("CLOUDSDK_PYTHON", "CLOUDSDK_ROOT_DIR")))
               and k.lower() not in {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
               and k not in {"GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"}}
        env.update({
            "CLOUDSDK_CONFIG": str(config),
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token),
            "CLOUDSDK_CORE_PROJECT": self.project,
            "CLOUDSDK_CORE_ACCOUNT": DEPLOYER,  # what `gcloud config get-value account` reports
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_SHOULD_PROMPT_TO_ENABLE_API": "false",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
            "CLOUDSDK_PROXY_TYPE": "http",
            "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
            "CLOUDSDK_PROXY_PORT": str(port),
        })
        for property_name, host in self.ENDPOINTS.items():
            suffix = "storage/v1/" if host == "storage" else ""
            env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{property_name}"] = f"http://{host}.{STUB_DOMAIN}/{suffix}"
        if tls is not None:
            ca_path, self._tls = tls
            env["CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE"] = str(ca_path)
        self.env = env
        self.port = port
        return self

    def apply_to(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make os.environ equal to `env` for the test, so code under test that runs gcloud reaches the stub."""
        for name in [n for n in os.environ if n not in self.env]:
            monkeypatch.delenv(name)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "GcloudStub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def plug(self, api: str, handler: Callable[[RecordedRequest], Any]) -> None:
        """Serve one more API: gcloud's endpoint for `api` comes here, and `handler` answers (JSON, or ApiError)."""
        EXTENSION_APIS.add(api)
        self.state.extensions[api] = handler
        self.env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api.upper()}"] = f"http://{api}.{STUB_DOMAIN}/"

    # running gcloud

    def gcloud(self, *args: str, check: bool = True, cwd: str | Path | None = None, timeout: float = 120,
               input: str | None = None) -> subprocess.CompletedProcess:
        """Run the real gcloud with `env`, its wall time kept in `calls`; `check` fails the test with its output."""
        gcloud = shutil.which("gcloud", path=self.env.get("PATH"))
        if gcloud is None:
            missing_tool("gcloud is not installed: install the Google Cloud SDK to run the deploy tests")
        started = time.monotonic()
        result = subprocess.run([gcloud, *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout, input=input)
        self.calls.append(GcloudCall(list(args), time.monotonic() - started, result.returncode, result.stdout,
                                     result.stderr))
        if check and result.returncode != 0:
            pytest.fail(f"gcloud {' '.join(args)} exited {result.returncode}\n--- stderr\n{result.stderr}"
                        f"\n--- stdout\n{result.stdout}\n--- requests\n" + "\n".join(map(repr, self.requests[-15:])),
                        pytrace=False)
        return result

    # recording

    def _record(self, request: RecordedRequest) -> None:
        with self.state.lock:
            self.requests.append(request)

    def _record_connect(self, target: str) -> None:
        with self.state.lock:
            self.connects.append(target)

    def requests_to(self, api: str | None = None, method: str | None = None,
                    path_contains: str | None = None) -> list[RecordedRequest]:
        """Recorded requests filtered by api (run|cloudbuild|storage|other), HTTP method and a piece of the path."""
        return [r for r in list(self.requests) if (api is None or r.api == api)
                and (method is None or r.method == method) and (path_contains is None or path_contains in r.path)]

    def sent_services(self, name: str | None = None) -> list[dict]:
        """The Service objects gcloud POSTed (create) or PUT (replace), oldest first, exactly as sent."""
        bodies = []
        for request in self.requests_to(api="run"):
            if request.method in {"POST", "PUT"} and re.search(r"/services(/[^/:]+)?$", request.path):
                if name is None or (request.body or {}).get("metadata", {}).get("name") == name:
                    bodies.append(request.body)
        return bodies

    def sent_builds(self) -> list[dict]:
        """The Build objects gcloud sent to builds.create, oldest first, exactly as sent."""
        return [r.body for r in self.requests_to(api="cloudbuild", method="POST") if r.path.endswith("/builds")]

    # state

    @property
    def services(self) -> dict[str, dict]:
        """Current services by name (all regions), as the API returns them."""
        with self.state.lock:
            return {name: copy.deepcopy(s) for (_, name), s in self.state.services.items()}

    def service(self, name: str, region: str | None = None) -> dict | None:
        with self.state.lock:
            found = self.state.services.get((region or self.region, name))
            return copy.deepcopy(found)

    def revisions(self, service: str, region: str | None = None) -> list[dict]:
        """The service's revisions, oldest first."""
        with self.state.lock:
            return [copy.deepcopy(r) for (reg, _), r in self.state.revisions.items()
                    if reg == (region or self.region) and r["metadata"]["labels"][SERVICE_LABEL] == service]

    def traffic(self, service: str, region: str | None = None) -> list[dict]:
        """status.traffic: where requests go now (latestRevision resolved to a revision name)."""
        found = self.service(service, region)
        return found["status"].get("traffic", []) if found else []

    def iam_policy(self, service: str, region: str | None = None) -> dict | None:
        with self.state.lock:
            return copy.deepcopy(self.state.iam_policies.get((region or self.region, service)))

    def is_public(self, service: str, region: str | None = None) -> bool:
        policy = self.iam_policy(service, region) or {}
        return any(b.get("role") == INVOKER_ROLE and "allUsers" in b.get("members", [])
                   for b in policy.get("bindings", []))

    @property
    def builds(self) -> list[dict]:
        with self.state.lock:
            return [copy.deepcopy(b) for b in self.state.builds.values()]

    @property
    def objects(self) -> dict[tuple[str, str], bytes]:
        """Stored objects' content by (bucket, name): e.g. the source tarball `gcloud builds submit` uploaded."""
        with self.state.lock:
            return {key: data for key, (_, data) in self.state.objects.items()}

    def seed_service(self, name: str, image: str, region: str | None = None, **template_spec: Any) -> dict:
        """Create a service directly (no gcloud start-up), as a first `gcloud run deploy` would have."""
        body = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"template": {"spec": {"containers": [{"image": image}], **template_spec}}}}
        with self.state.lock:
            return self.state._create_service(region or self.region, body, dry_run=False)

    # arranging failures

    def fail_next(self, status: int, message: str = "Injected failure", *, method: str | None = None,
                  path_contains: str | None = None, api: str | None = None,
                  body: Callable[[Any], bool] | None = None) -> None:
        """Answer the next matching request with `status` (4xx) and Google's error body.

        Without `method`/`path_contains`/`api`/`body` it matches the next write (POST/PUT/PATCH/DELETE other than the
        read-only IAM calls); `body` is a test on the parsed JSON body (e.g. the traffic an update asks for)."""
        if not 400 <= status < 500:
            raise ValueError("use a 4xx status: gcloud retries 5xx answers for about half a minute")

        def matches(request: RecordedRequest) -> bool:
            if method is None and path_contains is None and api is None and body is None:
                return _is_write(request)
            return ((method is None or request.method == method) and (api is None or request.api == api)
                    and (path_contains is None or path_contains in request.path)
                    and (body is None or (request.body is not None and body(request.body))))

        with self.state.lock:
            self.state.failures.append(_Failure(status, message, matches))

    def fail_next_revision(self, message: str = "The user-provided container failed the configured startup "
                                                "probe checks.") -> None:
        """Make the next revision fail its startup: the service reports Ready=False and keeps serving the old one."""
        with self.state.lock:
            self.state.revision_failures.append(message)

    def fail_next_build(self, status: str = "FAILURE", detail: str = "Build step 0 failed") -> None:
        """Make the next build end with `status` (FAILURE, INTERNAL_ERROR, TIMEOUT, CANCELLED)."""
        with self.state.lock:
            self.state.build_outcomes.append((status, detail))

    def new_project(self) -> None:
        """Behave as a project with nothing in it (see gcloud_stub_admin): only a new project's APIs answer, and
        Cloud Run and Cloud Build check the service account and repository they are given."""
        with self.state.lock:
            self.state.admin.enabled = set(NEW_PROJECT_SERVICES)

    def seed_bucket(self, name: str) -> None:
        """A bucket that exists (e.g. the model's), made without gcloud."""
        with self.state.lock:
            self.state._insert_bucket({"name": name})

    @property
    def admin(self) -> ProjectAdmin:
        """Project set-up state: `enabled`, `repositories`, `service_accounts`, `policies`, `pools`, `providers`."""
        return self.state.admin

    def deny_iam_permissions(self) -> None:
        """testIamPermissions grants nothing (a deployer without run.services.setIamPolicy)."""
        with self.state.lock:
            self.state.testable_permissions = set()


@contextlib.contextmanager
def gcloud_stub_server(workdir: Path | None = None, **kwargs: Any) -> Iterator[GcloudStub]:
    """Start the stub on 127.0.0.1:<free port> and stop it on exit; skips (or fails under
    ONNX_SERVE_REQUIRE_TOOLS) when gcloud is not installed."""
    if shutil.which("gcloud") is None:
        missing_tool("gcloud is not installed: install the Google Cloud SDK to run the deploy tests")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gcloud-stub-")))
        stub = stack.enter_context(GcloudStub(Path(workdir), **kwargs))
        yield stub
        if stub.errors:
            raise AssertionError(f"the gcloud stub failed while answering: {stub.errors!r}")


@pytest.fixture
def gcloud_stub(tmp_path: Path, request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[GcloudStub]:
    """A running stub for one test, with os.environ set to its `env` (so a task's `c.run("gcloud ...")` reaches
    it); gcloud wall times go to the test's user_properties."""
    with gcloud_stub_server(tmp_path / "gcloud-stub") as stub:
        stub.apply_to(monkeypatch)
        yield stub
        request.node.user_properties.append(
            ("gcloud_seconds", [(" ".join(c.args[:3]), round(c.seconds, 2)) for c in stub.calls]))

