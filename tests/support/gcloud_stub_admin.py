"""The project set-up APIs of the gcloud stand-in (`gcloud_stub.py`): what `invoke gcp.setup` makes gcloud call.

Served with real state, in the shapes of the APIs' v1 discovery documents:
- Cloud Resource Manager v1: projects.get (the project number).
- Service Usage v1: services.list (filter=state:ENABLED), services.batchEnable.
- Artifact Registry v1: projects.locations.repositories.{get,create}.
- IAM v1: projects.serviceAccounts.{get,create,getIamPolicy,setIamPolicy},
  projects.locations.workloadIdentityPools(.providers).{get,create}.
- Cloud Storage JSON API: buckets.{getIamPolicy,setIamPolicy} (`b/BUCKET/iam`).
Long-running operations finish at once (`done: true`) and can be read back by name.

A stub made with `GcloudStub.new_project()` behaves like a project with nothing in it: only the APIs a new project
has on answer (the others say SERVICE_DISABLED, as Google does), Cloud Build cannot push to an Artifact Registry
repository that does not exist, and Cloud Run refuses a runtime service account that does not exist or that the
deployer (`DEPLOYER`) may not act as. Without it every API answers, as the deploy tests expect.
"""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any

DEPLOYER = "stub-user@example.com"  # the account gcloud reports (CLOUDSDK_CORE_ACCOUNT); deploys run as it
ACT_AS_ROLES = {"roles/iam.serviceAccountUser", "roles/iam.serviceAccountAdmin", "roles/owner", "roles/editor"}
SERVICE_IDS = {
    "run": "run.googleapis.com", "cloudbuild": "cloudbuild.googleapis.com",
    "artifactregistry": "artifactregistry.googleapis.com", "iam": "iam.googleapis.com",
    "iamcredentials": "iamcredentials.googleapis.com", "sts": "sts.googleapis.com",
    "storage": "storage.googleapis.com", "serviceusage": "serviceusage.googleapis.com",
    "cloudresourcemanager": "cloudresourcemanager.googleapis.com",
}
TITLES = {"run.googleapis.com": "Cloud Run Admin API", "cloudbuild.googleapis.com": "Cloud Build API",
          "artifactregistry.googleapis.com": "Artifact Registry API", "iam.googleapis.com": "Identity and Access "
          "Management (IAM) API", "iamcredentials.googleapis.com": "IAM Service Account Credentials API",
          "sts.googleapis.com": "Security Token Service API"}
# What Google turns on in every new project (Service Usage itself, Resource Manager, Cloud Storage).
NEW_PROJECT_SERVICES = {"serviceusage.googleapis.com", "cloudresourcemanager.googleapis.com", "storage.googleapis.com"}


class ProjectAdmin:
    """Project-level state: enabled APIs, repositories, service accounts, IAM policies, identity pools."""

    def __init__(self, project: str, project_number: str, api_error: type[Exception], etag):
        self.project = project
        self.project_number = project_number
        self.ApiError = api_error
        self.etag = etag
        self.enabled: set[str] | None = None  # None: every API answers (no project set-up modelled)
        self.repositories: dict[tuple[str, str], dict] = {}
        self.service_accounts: dict[str, dict] = {}
        self.policies: dict[str, dict] = {}  # resource ("sa/EMAIL", "bucket/NAME") -> IAM policy
        self.pools: dict[str, dict] = {}
        self.providers: dict[tuple[str, str], dict] = {}
        self.operations: dict[str, dict] = {}

    @property
    def strict(self) -> bool:
        return self.enabled is not None

    # ---- checks other parts of the stub make ------------------------------------------------------------------

    def require_enabled(self, api: str) -> None:
        service = SERVICE_IDS.get(api)
        if self.enabled is None or service is None or service in self.enabled:
            return
        raise self.ApiError(
            403, f"{TITLES.get(service, service)} has not been used in project {self.project_number} before or it "
                 f"is disabled. Enable it by visiting https://console.developers.google.com/apis/api/{service}/"
                 f"overview?project={self.project_number} then retry. [reason: SERVICE_DISABLED]")

    def require_runtime_account(self, email: str) -> None:
        """Cloud Run's checks of serviceAccountName on a write: it exists, and the deployer may act as it."""
        if not self.strict or email.endswith("-compute@developer.gserviceaccount.com"):
            return
        policy = self.policies.get(f"sa/{email}", {})
        allowed = any(b["role"] in ACT_AS_ROLES and f"user:{DEPLOYER}" in b.get("members", [])
                      for b in policy.get("bindings", []))
        if email not in self.service_accounts or not allowed:
            raise self.ApiError(403, f"Permission 'iam.serviceaccounts.actAs' denied on service account {email} "
                                     "(or it may not exist).")

    def require_repository(self, image: str) -> None:
        """Cloud Build's push: the Artifact Registry repository in the image name must exist."""
        match = re.match(r"([a-z0-9-]+)-docker\.pkg\.dev/([^/]+)/([^/]+)/", image)
        if self.strict and match and (match[1], match[3]) not in self.repositories:
            raise self.ApiError(404, f"name unknown: Repository \"{match[3]}\" not found")

    # ---- routing ----------------------------------------------------------------------------------------------

    def handle(self, api: str, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        path = path.lstrip("/")
        if "/operations/" in path or path.startswith("v1/operations/"):
            name = path.split("/", 1)[1]
            if name not in self.operations:
                raise self.ApiError(404, f"Operation {name} not found")
            return copy.deepcopy(self.operations[name])
        if api == "cloudresourcemanager":
            match = re.fullmatch(r"v1/projects/([^/:]+)", path)
            if match and method == "GET":
                self._project(match[1])
                return {"projectNumber": self.project_number, "projectId": self.project, "lifecycleState": "ACTIVE",
                        "name": self.project, "createTime": "2026-01-01T00:00:00.000Z"}
        if api == "serviceusage":
            return self._serviceusage(method, path, query, body)
        if api == "artifactregistry":
            return self._artifactregistry(method, path, query, body)
        if api == "iam":
            return self._iam(method, path, query, body)
        raise self.ApiError(404, f"Unknown path /{path}")

    def _project(self, ident: str) -> None:
        if ident not in {self.project, self.project_number, "-"}:
            raise self.ApiError(403, f"Permission denied on resource project {ident}.")

    def _operation(self, prefix: str, response: dict, type_name: str) -> dict:
        name = f"{prefix}operations/{uuid.uuid4().hex[:16]}"
        operation = {"name": name, "done": True, "response": {"@type": f"type.googleapis.com/{type_name}",
                                                                **copy.deepcopy(response)}}
        self.operations[name] = operation
        return copy.deepcopy(operation)

    # ---- Service Usage ----------------------------------------------------------------------------------------

    def _service(self, service_id: str) -> dict:
        return {"name": f"projects/{self.project_number}/services/{service_id}", "parent":
                f"projects/{self.project_number}", "config": {"name": service_id, "title": TITLES.get(service_id,
                service_id)}, "state": "ENABLED"}

    def _serviceusage(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        match = re.fullmatch(r"v1/projects/([^/:]+)/services(?::(batchEnable))?", path)
        if not match:
            raise self.ApiError(404, f"Unknown path /{path}")
        self._project(match[1])
        enabled = self.enabled if self.enabled is not None else set(SERVICE_IDS.values())
        if method == "GET":
            return {"services": [self._service(s) for s in sorted(enabled)]}
        asked = (body or {}).get("serviceIds") or []
        unknown = [s for s in asked if not s.endswith(".googleapis.com")]
        if unknown:
            raise self.ApiError(400, f"Service {unknown[0]} not found or permission denied.")
        if self.enabled is not None:
            self.enabled.update(asked)
        return self._operation("", {"services": [self._service(s) for s in asked]},
                               "google.api.serviceusage.v1.BatchEnableServicesResponse")

    # ---- Artifact Registry ------------------------------------------------------------------------------------

    def _artifactregistry(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        match = re.fullmatch(r"v1/projects/([^/]+)/locations/([^/]+)/repositories(?:/([^/:]+))?", path)
        if not match:
            raise self.ApiError(404, f"Unknown path /{path}")
        self._project(match[1])
        location, repo = match[2], match[3] or query.get("repositoryId", "")
        name = f"projects/{self.project}/locations/{location}"
        return self._get_or_create(self.repositories, (location, repo), method, match[3] is None, lambda: (
            {**(body or {}), "name": f"{name}/repositories/{repo}", "createTime": "2026-01-01T00:00:00Z"},
            f"{name}/", "google.devtools.artifactregistry.v1.Repository"))

    def _get_or_create(self, table: dict, key: Any, method: str, collection: bool, make) -> Any:
        """GET one resource, or POST to its collection (the new id in the query), as the v1 APIs answer;
        `make()` gives the new resource, its operations' name prefix and its type."""
        if method == "GET" and not collection:
            if key not in table:
                raise self.ApiError(404, "Requested entity was not found.")
            return copy.deepcopy(table[key])
        if method == "POST" and collection:
            if key in table:
                raise self.ApiError(409, "Requested entity already exists")
            resource, prefix, type_name = make()
            table[key] = resource
            return self._operation(prefix, resource, type_name)
        raise self.ApiError(405, f"{method} is not supported here")

    # ---- IAM: service accounts, their policies, workload identity pools ---------------------------------------

    def _iam(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        match = re.fullmatch(r"v1/projects/([^/]+)/serviceAccounts(?:/([^/:]+))?(?::(\w+))?", path)
        if match:
            self._project(match[1])
            return self._service_accounts(method, match[2], match[3], body)
        match = re.fullmatch(r"v1/projects/([^/]+)/locations/global/workloadIdentityPools(?:/([^/:]+))?"
                             r"(?:/providers(?:/([^/:]+))?)?", path)
        if match:
            self._project(match[1])
            return self._identity_pools(method, path, match[2], match[3], query, body)
        raise self.ApiError(404, f"Unknown path /{path}")

    def _service_accounts(self, method: str, email: str | None, verb: str | None, body: Any) -> Any:
        if email is None and method == "POST":
            account_id = (body or {}).get("accountId", "")
            if not re.fullmatch(r"[a-z]([-a-z0-9]{4,28}[a-z0-9])", account_id):
                raise self.ApiError(400, f"Invalid account id {account_id!r}: 6-30 lowercase letters, digits, "
                                         "hyphens.")
            email = f"{account_id}@{self.project}.iam.gserviceaccount.com"
            if email in self.service_accounts:
                raise self.ApiError(409, f"Service account {account_id} already exists within project "
                                         f"projects/{self.project}.")
            self.service_accounts[email] = {
                "name": f"projects/{self.project}/serviceAccounts/{email}", "projectId": self.project,
                "uniqueId": str(uuid.uuid4().int)[:21], "email": email, "etag": "MDEwMjE5MjA=",
                "displayName": ((body or {}).get("serviceAccount") or {}).get("displayName", ""),
                "oauth2ClientId": str(uuid.uuid4().int)[:21],
            }
            self.policies[f"sa/{email}"] = {"version": 1, "etag": "ACAB"}
            return copy.deepcopy(self.service_accounts[email])
        if email not in self.service_accounts:
            raise self.ApiError(404, f"Unknown service account {email}")
        if verb is None and method == "GET":
            return copy.deepcopy(self.service_accounts[email])
        if verb in {"getIamPolicy", "setIamPolicy"} and method == "POST":
            return self.policy(f"sa/{email}", body if verb == "setIamPolicy" else None)
        raise self.ApiError(405, f"{method} {verb or ''} is not supported on service accounts")

    def policy(self, resource: str, update: dict | None) -> dict:
        """getIamPolicy (update None) or setIamPolicy with the etag check every IAM API makes."""
        current = self.policies.setdefault(resource, {"version": 1, "etag": "ACAB"})
        if update is None:
            return copy.deepcopy(current)
        policy = copy.deepcopy(update.get("policy", update))
        if policy.get("etag") and policy["etag"] != current["etag"]:
            raise self.ApiError(409, "There were concurrent policy changes. Please retry the whole read-modify-write "
                                     "with exponential backoff.")
        policy["etag"] = self.etag()
        policy.setdefault("version", 1)
        self.policies[resource] = policy
        return copy.deepcopy(policy)

    def members(self, resource: str, role: str) -> list[str]:
        for binding in self.policies.get(resource, {}).get("bindings", []):
            if binding.get("role") == role:
                return list(binding.get("members", []))
        return []

    def _identity_pools(self, method: str, path: str, pool: str | None, provider: str | None,
                        query: dict[str, str], body: Any) -> Any:
        base = f"projects/{self.project_number}/locations/global/workloadIdentityPools"
        if "/providers" not in path:
            pool = pool or query.get("workloadIdentityPoolId", "")
            return self._get_or_create(self.pools, pool, method, path.endswith("Pools"), lambda: (
                {**(body or {}), "name": f"{base}/{pool}", "state": "ACTIVE"}, f"{base}/{pool}/",
                "google.iam.v1.WorkloadIdentityPool"))
        if pool not in self.pools:
            raise self.ApiError(404, "Requested entity was not found.")
        collection = provider is None
        provider = provider or query.get("workloadIdentityPoolProviderId", "")
        if collection and method == "POST" and not ((body or {}).get("oidc") or {}).get("issuerUri", "").startswith(
                "https://"):
            raise self.ApiError(400, "oidc.issuerUri must be an https URL.")
        return self._get_or_create(self.providers, (pool, provider), method, collection, lambda: (
            {**(body or {}), "name": f"{base}/{pool}/providers/{provider}", "state": "ACTIVE"},
            f"{base}/{pool}/providers/{provider}/", "google.iam.v1.WorkloadIdentityPoolProvider"))
