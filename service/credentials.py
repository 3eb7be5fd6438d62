"""The Cloud Storage client the model download uses, and the keyless credentials it carries on Fly.io.

On Cloud Run (and anywhere Application Default Credentials work) this is `storage.Client()`. On a Fly Machine with
GCP_WORKLOAD_IDENTITY_PROVIDER set, no key exists anywhere: the machine's API socket mints an OIDC token for the
provider's audience, Google's token exchange (STS) trades it for a federated token, and that impersonates
GCP_SERVICE_ACCOUNT (the runtime account `invoke gcp.setup --fly` binds to this app). google-auth's external_account
credentials do the exchange and refresh it before it expires; this module only supplies Fly's token.
(A `url` credential source cannot do this: Fly's endpoint is a POST over a unix socket.)
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import TYPE_CHECKING

from google.auth import exceptions, identity_pool

if TYPE_CHECKING:
    from google.cloud import storage

    from service.settings import Settings

JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_only"]


class FlyTokenSupplier(identity_pool.SubjectTokenSupplier):
    """Fly's OIDC token for the provider's audience, from the machine API (`POST /v1/tokens/oidc` on /.fly/api)."""

    def __init__(self, socket_path: str, timeout: float = 10):
        self.socket_path = socket_path
        self.timeout = timeout

    def get_subject_token(self, context, request) -> str:
        body = json.dumps({"aud": context.audience})
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            connection.request("POST", "/v1/tokens/oidc", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            token = response.read().decode().strip()
        except OSError as exc:
            raise exceptions.RefreshError(
                f"no Fly machine API at {self.socket_path} ({exc}): keyless credentials work only on a Fly Machine; "
                "elsewhere unset GCP_WORKLOAD_IDENTITY_PROVIDER and use GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        finally:
            connection.close()
        if response.status != 200 or token.count(".") != 2:
            raise exceptions.RefreshError(
                f"the Fly machine API refused an OIDC token ({response.status}: {token[:200]}); the app must run on "
                f"a Fly Machine, whose API socket is {self.socket_path} (FLY_API_SOCKET)"
            )
        return token


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def fly_credentials(settings: Settings) -> identity_pool.Credentials:
    """external_account credentials: Fly token -> STS -> (optionally) impersonate the runtime service account."""
    impersonation = None
    if settings.gcp_service_account:
        impersonation = (f"{settings.gcp_iam_credentials_url.rstrip('/')}/v1/projects/-/serviceAccounts/"
                         f"{settings.gcp_service_account}:generateAccessToken")
    return identity_pool.Credentials(
        audience=f"//iam.googleapis.com/{settings.gcp_workload_identity_provider}",
        subject_token_type=JWT_TOKEN_TYPE,
        token_url=settings.gcp_sts_url,
        subject_token_supplier=FlyTokenSupplier(settings.fly_api_socket),
        service_account_impersonation_url=impersonation,
        scopes=SCOPES,
    )


def storage_client(settings: Settings | None = None) -> storage.Client:
    """The client for the model download: keyless on Fly when configured, else Application Default Credentials."""
    from google.cloud import storage

    from service.settings import load_settings

    if settings is None:  # the service's own environment, which start-up has validated
        if not os.environ.get("GCP_WORKLOAD_IDENTITY_PROVIDER"):
            return storage.Client()
        settings = load_settings()
    if not settings.gcp_workload_identity_provider:
        return storage.Client()
    # The project must be explicit: with external_account credentials the client cannot find it (and would
    # otherwise ask Resource Manager at start-up).
    return storage.Client(credentials=fly_credentials(settings), project=settings.gcp_project)


def describe_refresh_error(exc: Exception) -> str:
    """Why getting a Google token failed, and what to do about it (google-auth puts the reply body in args[1])."""
    args = [str(a) for a in exc.args] or [str(exc)]
    text, everything = args[0], " ".join(args)
    if "expired" in everything.lower() or "stale" in everything.lower():
        return (f"the Fly OIDC token was refused as expired ({text}); check the machine's clock, and that the "
                "token is fetched fresh for each exchange (it lives ~10 minutes)")
    if "unauthorized_client" in everything or "invalid_grant" in everything or "invalid_target" in everything:
        return (f"Google's token exchange refused the Fly token ({text}); the provider trusts one Fly organisation "
                "and app: check GCP_WORKLOAD_IDENTITY_PROVIDER and re-run `invoke gcp.setup --fly` for this app")
    if "getAccessToken" in everything or "impersonated" in everything:
        return (f"impersonating GCP_SERVICE_ACCOUNT was refused ({text}: permission "
                "iam.serviceAccounts.getAccessToken); bind this app to the account (roles/iam.workloadIdentityUser) "
                "with `invoke gcp.setup --fly`, and check GCP_SERVICE_ACCOUNT")
    return text
