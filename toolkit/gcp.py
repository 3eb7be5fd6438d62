"""`invoke gcp.setup`: make a Google Cloud project ready for the deploy targets, idempotently.

Each step reads first (describe, get-iam-policy) and changes only what is missing, so a second run changes nothing
and says so. What it makes: the APIs the targets need, the Artifact Registry repository, a runtime service account
that may only read the model's bucket, the deployer's right to act as it, and with --fly a workload identity pool
and OIDC provider that trust only this Fly app. Every gcloud command is built here, from config.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from typing import Callable

from invoke import Context, Exit, task

from toolkit.model import require_gcs_model

READER_ROLE = "roles/storage.objectViewer"  # read objects of one bucket, nothing else
ACT_AS_ROLE = "roles/iam.serviceAccountUser"  # deploy a service that runs as the account
WIF_USER_ROLE = "roles/iam.workloadIdentityUser"  # federated identities may impersonate the account
FLY_ISSUER = "https://oidc.fly.io/{org}"
NOT_FOUND = re.compile(r"NOT_FOUND|not found|does not exist|404")


def runtime_account(c: Context) -> str:
    """The runtime service account's email: cloudrun.service_account when set, else the one gcp.setup creates."""
    return c.cloudrun.service_account or f"{c.gcp.runtime_account}@{c.gcp.project}.iam.gserviceaccount.com"


def model_bucket(c: Context) -> str:
    return str(c.model.uri)[len("gs://"):].split("/", 1)[0]


def provider_name(project_number: str, c: Context) -> str:
    """The provider's resource name: what a Fly machine puts in its token's `aud` and google-auth's `audience`."""
    return (f"projects/{project_number}/locations/global/workloadIdentityPools/{c.gcp.wif_pool}"
            f"/providers/{provider_id(c)}")


def provider_id(c: Context) -> str:
    return c.gcp.wif_provider or f"fly-{c.fly.app}"[:32].rstrip("-")


# Artifact Registry's vulnerability scanning: automatic scans of pushed images, and on-demand scans (image.scan).
SCANNING_APIS = ["containeranalysis.googleapis.com", "containerscanning.googleapis.com", "ondemandscanning.googleapis.com"]


def apis(c: Context, cloudrun: bool, fly: bool, scanning: bool = False) -> list[str]:
    """The APIs the chosen targets call: Cloud Run and its registry, or Fly's token exchange and impersonation,
    and with `scanning` Artifact Analysis' scanners."""
    needed = ["iam.googleapis.com"]
    if scanning:
        needed += SCANNING_APIS
    if cloudrun:
        needed += ["run.googleapis.com", "artifactregistry.googleapis.com"]
        if c.cloudrun.build == "cloudbuild":
            needed.append("cloudbuild.googleapis.com")
    if fly:
        needed += ["sts.googleapis.com", "iamcredentials.googleapis.com"]
    return needed


@dataclass
class Step:
    """One thing the project needs: how to tell it is there, the command that makes it, and who may run that."""

    what: str
    exists: Callable[[], bool]
    command: list[str]
    permission: str  # what the caller needs to run `command`
    role: str  # the predefined role that holds it


class Setup:
    """The project's set-up steps, in order, built from config."""

    def __init__(self, c: Context, cloudrun: bool, fly: bool, scanning: bool = False):
        self.c, self.cloudrun, self.fly, self.scanning = c, cloudrun, fly, scanning
        self.project = c.gcp.project
        self.where = ["--project", self.project]
        self.account = runtime_account(c)
        self.bucket = model_bucket(c)
        self.number = "PROJECT_NUMBER"

    # reading

    def read(self, command: list[str], step: str, permission: str, role: str) -> str | None:
        """stdout of a read-only gcloud command, None when what it reads does not exist."""
        result = self.c.run(shlex.join(command), hide=True, warn=True)
        if result.ok:
            return result.stdout
        if NOT_FOUND.search(result.stderr) and "SERVICE_DISABLED" not in result.stderr:
            return None
        raise Exit(explain(self.c, command, result.stderr, step, permission, role))

    def has_member(self, command: list[str], role: str, member: str, step: str, permission: str,
                   admin_role: str) -> bool:
        policy = json.loads(self.read([*command, "--format=json"], step, permission, admin_role) or "{}")
        return any(b.get("role") == role and member in b.get("members", []) for b in policy.get("bindings", []))

    def deployer(self) -> str:
        member = deployer(self.c)
        if member is None:
            raise Exit("gcloud has no active account, so the deployer to let act as the runtime account is "
                       "unknown: run `gcloud auth login`, or set gcp.deployer (e.g. user:me@example.com).")
        return member

    # the steps

    def steps(self) -> list[Step]:
        steps = [self.enable_apis()]
        if self.cloudrun:
            steps.append(self.repository())
        steps += [self.service_account(), self.bucket_reader()]
        if self.cloudrun:
            steps.append(self.binding(self.deployer(), ACT_AS_ROLE, "the deployer may act as"))
        if self.fly:
            steps += [self.pool(), self.provider(), self.binding(self.fly_principal(), WIF_USER_ROLE,
                                                                "the Fly app may impersonate")]
        return steps

    def enable_apis(self) -> Step:
        needed = apis(self.c, self.cloudrun, self.fly, self.scanning)
        listing = ["gcloud", "services", "list", "--enabled", *self.where, "--format=value(config.name)"]
        missing = needed

        def exists() -> bool:
            nonlocal missing
            enabled = set((self.read(listing, "list the enabled APIs", "serviceusage.services.list",
                                     "roles/serviceusage.serviceUsageViewer") or "").split())
            missing = [api for api in needed if api not in enabled]
            step.command = ["gcloud", "services", "enable", *missing, *self.where]
            step.what = "APIs " + ", ".join(missing or needed)
            return not missing

        step = Step("APIs " + ", ".join(needed), exists, ["gcloud", "services", "enable", *needed, *self.where],
                    "serviceusage.services.enable", "roles/serviceusage.serviceUsageAdmin")
        return step

    def repository(self) -> Step:
        repo, region = self.c.gcp.repository, self.c.gcp.region
        where = ["--location", region, *self.where]
        describe = ["gcloud", "artifacts", "repositories", "describe", repo, *where, "--format=value(name)"]
        permission, role = "artifactregistry.repositories.create", "roles/artifactregistry.admin"
        return Step(
            f"Artifact Registry repository {repo} in {region}",
            lambda: self.read(describe, "read the repository", permission, role) is not None,
            ["gcloud", "artifacts", "repositories", "create", repo, "--repository-format=docker", *where,
             "--description=onnx-serve images"],
            permission, role,
        )

    def service_account(self) -> Step:
        account_id = self.account.split("@", 1)[0]
        describe = ["gcloud", "iam", "service-accounts", "describe", self.account, *self.where, "--format=value(email)"]
        permission, role = "iam.serviceAccounts.create", "roles/iam.serviceAccountAdmin"
        return Step(
            f"runtime service account {self.account}",
            lambda: self.read(describe, "read the service account", permission, role) is not None,
            ["gcloud", "iam", "service-accounts", "create", account_id, *self.where,
             f"--display-name=onnx-serve runtime: reads gs://{self.bucket}"],
            permission, role,
        )

    def bucket_reader(self) -> Step:
        member = f"serviceAccount:{self.account}"
        bucket = f"gs://{self.bucket}"
        permission, role = "storage.buckets.setIamPolicy", "roles/storage.admin"

        def exists() -> bool:
            command = ["gcloud", "storage", "buckets", "get-iam-policy", bucket, *self.where]
            result = self.c.run(shlex.join([*command, "--format=json"]), hide=True, warn=True)
            if not result.ok and re.search(r"not found|404", result.stderr):
                raise Exit(f"bucket {bucket} (from model.uri) does not exist: create it and upload the model, "
                           f"e.g. `gcloud storage buckets create {bucket} --location {self.c.gcp.region} "
                           f"--project {self.project}` then `gcloud storage cp model.onnx {self.c.model.uri}`.")
            return self.has_member(command, READER_ROLE, member, "read the bucket's IAM policy",
                                   "storage.buckets.getIamPolicy", role)

        return Step(
            f"{READER_ROLE} on {bucket} (only) for {self.account}", exists,
            ["gcloud", "storage", "buckets", "add-iam-policy-binding", bucket, f"--member={member}",
             f"--role={READER_ROLE}", *self.where],
            permission, role,
        )

    def binding(self, member: str, role: str, what: str) -> Step:
        command = ["gcloud", "iam", "service-accounts", "get-iam-policy", self.account, *self.where]
        permission, admin_role = "iam.serviceAccounts.setIamPolicy", "roles/iam.serviceAccountAdmin"
        return Step(
            f"{what} {self.account} ({role} for {member})",
            lambda: self.has_member(command, role, member, "read the service account's IAM policy",
                                    "iam.serviceAccounts.getIamPolicy", admin_role),
            ["gcloud", "iam", "service-accounts", "add-iam-policy-binding", self.account, f"--member={member}",
             f"--role={role}", *self.where],
            permission, admin_role,
        )

    def pool(self) -> Step:
        pool = self.c.gcp.wif_pool
        where = ["--location=global", *self.where]
        describe = ["gcloud", "iam", "workload-identity-pools", "describe", pool, *where, "--format=value(name)"]
        permission, role = "iam.workloadIdentityPools.create", "roles/iam.workloadIdentityPoolAdmin"
        return Step(
            f"workload identity pool {pool}",
            lambda: self.read(describe, "read the workload identity pool", permission, role) is not None,
            ["gcloud", "iam", "workload-identity-pools", "create", pool, *where, "--display-name=Fly.io machines"],
            permission, role,
        )

    def provider(self) -> Step:
        c, pool, provider = self.c, self.c.gcp.wif_pool, provider_id(self.c)
        where = ["--workload-identity-pool", pool, "--location=global", *self.where]
        describe = ["gcloud", "iam", "workload-identity-pools", "providers", "describe", provider, *where,
                    "--format=value(name)"]
        permission, role = "iam.workloadIdentityPoolProviders.create", "roles/iam.workloadIdentityPoolAdmin"
        # Only tokens that Fly minted for this organisation's app pass: no other Fly app can use the provider.
        condition = f"assertion.org_name == '{c.fly.org}' && assertion.app_name == '{c.fly.app}'"
        return Step(
            f"OIDC provider {provider} trusting {FLY_ISSUER.format(org=c.fly.org)} for app {c.fly.app} only",
            lambda: self.read(describe, "read the provider", permission, role) is not None,
            ["gcloud", "iam", "workload-identity-pools", "providers", "create-oidc", provider, *where,
             f"--issuer-uri={FLY_ISSUER.format(org=c.fly.org)}",
             "--attribute-mapping=google.subject=assertion.sub,attribute.app_name=assertion.app_name,"
             "attribute.org_name=assertion.org_name",
             f"--attribute-condition={condition}"],
            permission, role,
        )

    def fly_principal(self) -> str:
        return (f"principalSet://iam.googleapis.com/projects/{self.number}/locations/global/workloadIdentityPools/"
                f"{self.c.gcp.wif_pool}/attribute.app_name/{self.c.fly.app}")

    def project_number(self) -> str:
        command = ["gcloud", "projects", "describe", self.project, "--format=value(projectNumber)"]
        number = self.read(command, "read the project", "resourcemanager.projects.get", "roles/browser")
        if not number:
            raise Exit(f"project {self.project} not found (gcp.project): check the id with `gcloud projects list`.")
        return number.strip()


def deployer(c: Context) -> str | None:
    """The IAM member that runs deploys and this set-up: gcp.deployer, else gcloud's active account."""
    if c.gcp.deployer:
        return c.gcp.deployer
    account = c.run("gcloud config get-value account", hide=True, warn=True).stdout.strip()
    if not account or account == "(unset)":
        return None
    return f"{'serviceAccount' if account.endswith('.gserviceaccount.com') else 'user'}:{account}"


def require_runtime_account(c: Context) -> None:
    """Before a Cloud Run deploy: the runtime account exists (else Cloud Run refuses it after the build)."""
    if c.cloudrun.service_account:
        return  # the user's own choice
    email = runtime_account(c)
    command = ["gcloud", "iam", "service-accounts", "describe", email, "--project", c.gcp.project, "--format=value(email)"]
    result = c.run(shlex.join(command), hide=True, warn=True)
    if not result.ok:
        raise Exit(f"the runtime service account {email} is not there ({result.stderr.strip().splitlines()[-1:]}): "
                   "run `invoke gcp.setup` once to make the project ready, or set cloudrun.service_account.")


def explain(c: Context, command: list[str], stderr: str, step: str, permission: str, role: str) -> str:
    """A failed gcloud call as the fix: the API to enable, or the permission missing and the grant that adds it."""
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    disabled = re.search(r"apis/api/([a-z0-9.]+\.googleapis\.com)", stderr)
    if disabled or "SERVICE_DISABLED" in stderr:
        api = disabled.group(1) if disabled else "the API named above"
        return (f"cannot {step}: {api} is not enabled in project {c.gcp.project}.\n"
                f"fix: gcloud services enable {api} --project {c.gcp.project}\n({detail})")
    if re.search(r"PERMISSION_DENIED|Permission .* denied|does not have .*permission|403", stderr):
        named = re.search(r"[Pp]ermission '?([a-z]+\.[a-zA-Z]+\.[a-zA-Z]+)'?", stderr)
        member = deployer(c) or "user:YOU@EXAMPLE.COM"
        return (f"cannot {step}: {member} lacks permission {named.group(1) if named else permission} in project "
                f"{c.gcp.project}.\nfix: ask a project owner to grant {role}: gcloud projects add-iam-policy-binding "
                f"{c.gcp.project} --member={member} --role={role}\n({detail})")
    return f"cannot {step}: `{shlex.join(command)}` failed:\n{stderr.strip()}"


def check_ready(c: Context, cloudrun: bool, fly: bool, dry_run: bool) -> None:
    if not (cloudrun or fly):
        raise Exit("--no-cloudrun without --fly sets up nothing: drop --no-cloudrun, or add --fly.")
    if not c.gcp.project:
        raise Exit("gcp.project is not set: put `gcp: {project: MY-PROJECT}` in invoke.yaml or set INVOKE_GCP_PROJECT.")
    require_gcs_model(c, "Cloud Run and Fly")
    if fly and not (c.fly.app and c.fly.org):
        raise Exit("--fly needs fly.app and fly.org (the Fly organisation slug, `flyctl orgs list`): set them in "
                   "invoke.yaml or as INVOKE_FLY_APP / INVOKE_FLY_ORG.")
    if dry_run:
        return
    if not shutil.which("gcloud"):
        raise Exit("gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install).")


@task(
    help={
        "cloudrun": "set up for Cloud Run: run and registry APIs, repository, deployer may act as the runtime "
                    "account (default on; --no-cloudrun for a Fly-only project)",
        "fly": "also let the Fly app read the bucket without a key: workload identity pool, provider, binding",
        "scanning": "also enable Artifact Registry's vulnerability scanning: automatic on push, and on-demand for "
                    "`invoke image.scan` (Container Scanning and On-Demand Scanning APIs; billed per image scanned)",
        "dry_run": "print every command instead of running it",
    }
)
def setup(c, cloudrun=True, fly=False, scanning=False, dry_run=False):
    """Make the Google Cloud project ready to deploy: APIs, registry, least-privilege runtime account, Fly trust."""
    dry_run = dry_run or c.config.run.dry
    check_ready(c, cloudrun, fly, dry_run)
    plan = Setup(c, cloudrun, fly, scanning)
    if fly and not dry_run:
        plan.number = plan.project_number()
    elif fly:
        print(f"# PROJECT_NUMBER below: gcloud projects describe {c.gcp.project} --format='value(projectNumber)'")
    changed = 0
    for step in plan.steps():
        if dry_run:
            print(f"# {step.what}, unless it is there already:")
            c.run(shlex.join(step.command), dry=True)
            continue
        if step.exists():
            print(f"ok       {step.what}")
            continue
        result = c.run(shlex.join(step.command), hide=True, warn=True)
        if not result.ok:
            raise Exit(explain(c, step.command, result.stderr, f"create {step.what}", step.permission, step.role))
        print(f"created  {step.what}")
        changed += 1
    if not dry_run:
        print(f"project {c.gcp.project}: " + (f"{changed} change(s) made" if changed else
                                              "nothing to change, it was already set up"))
    targets = " and ".join(name for name, chosen in (("Cloud Run", cloudrun), ("Fly", fly)) if chosen)
    print(f"{targets} run{'s' if ' and ' not in targets else ''} as {runtime_account(c)}, which can only read "
          f"gs://{model_bucket(c)}.")
    if cloudrun:
        print_release_grant(c, plan.deployer())
    if fly:
        print_fly_settings(c, provider_name(plan.number, c))


def print_release_grant(c: Context, member: str) -> None:
    """`invoke release` judges traffic steps on Cloud Monitoring: a project-level read grant, named, not made (a
    project IAM change is an owner's call)."""
    from toolkit.monitoring import VIEWER_ROLE

    print(f"\n`invoke release --target cloudrun` reads Cloud Monitoring; unless {member} can already, a project "
          f"owner grants it:\n  gcloud projects add-iam-policy-binding {c.gcp.project} --member={member} "
          f"--role={VIEWER_ROLE}")


def print_fly_settings(c: Context, provider: str) -> None:
    """What the Fly app needs to exchange its token: `invoke deploy --target fly` passes it as --env."""
    print("\nFly: put this in invoke.yaml (`invoke deploy --target fly` passes it to the app):\n"
          f"  fly:\n    workload_identity_provider: {provider}\n"
          "or set these in fly.toml [env] yourself:\n"
          f'  GCP_WORKLOAD_IDENTITY_PROVIDER = "{provider}"\n'
          f'  GCP_SERVICE_ACCOUNT = "{runtime_account(c)}"\n'
          f'  GOOGLE_CLOUD_PROJECT = "{c.gcp.project}"')
