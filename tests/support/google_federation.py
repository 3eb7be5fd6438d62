"""Local stand-ins for keyless Fly -> Cloud Storage (workload identity federation), for the real google-auth and the
real google-cloud-storage client:

- `FlyMachineApi`: the machine API unix socket (`/.fly/api`); `POST /v1/tokens/oidc {"aud": ...}` answers a JWT with
  Fly's claims (iss https://oidc.fly.io/ORG, sub ORG:APP:MACHINE, app_name, org_name, exp ~10 min) as the raw body.
- `GoogleTokenServices`: Google's token exchange (STS, `POST /v1/token`, a form) and IAM Credentials
  (`POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`, JSON), checking what Google checks: the
  audience is the provider's, the issuer is the org's, the provider's attribute condition (this org and app) holds,
  the token has not expired, and the federated token may impersonate the account. Errors in Google's shapes.
- `BearerGate`: an HTTP front of the storage emulator (which checks no credentials) that answers 401 unless the
  request carries an access token the impersonation stand-in issued and that has not expired, records every token
  it saw, and passes the request on to the emulator with its Authorization header.

The JWTs are not signed (the stand-in STS does not verify signatures; Google does, with Fly's JWKS).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import itertools
import json
import socketserver
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status: int, payload: bytes | dict | str, content_type: str = "application/json") -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else (
            payload.encode() if isinstance(payload, str) else payload)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ---- Fly machine API ------------------------------------------------------------------------------------------------


@dataclass
class FlyMachineApi:
    """The `/.fly/api` socket of one machine of APP in ORG."""

    socket_path: Path
    org: str = "acme"
    app: str = "my-onnx-app"
    machine: str = "148ed193b95089"
    lifetime: float = 600  # seconds from iat to exp; negative: already expired
    refuse: int | None = None  # answer this status instead of a token
    audiences: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def mint(self, audience: str) -> str:
        now = int(time.time())
        claims = {
            "iss": f"https://oidc.fly.io/{self.org}", "sub": f"{self.org}:{self.app}:{self.machine}", "aud": audience,
            "app_id": "3671581", "app_name": self.app, "org_id": "29873298", "org_name": self.org,
            "machine_id": self.machine, "machine_name": "young-sun-2233", "region": "iad",
            "image": "registry.fly.io/app:deployment-01", "image_digest": "sha256:" + "0" * 64,
            "iat": now, "nbf": now, "exp": int(now + self.lifetime), "jti": f"fly-{len(self.tokens)}",
        }
        return f"{_b64({'alg': 'RS256', 'kid': 'fly', 'typ': 'JWT'})}.{_b64(claims)}.c2lnbmF0dXJl"

    @contextlib.contextmanager
    def serve(self) -> Iterator["FlyMachineApi"]:
        api = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                body = self.body()
                if self.path != "/v1/tokens/oidc":
                    return self.answer(404, "404 page not found\n", "text/plain")
                audience = json.loads(body or b"{}").get("aud", "")
                api.audiences.append(audience)
                if api.refuse:
                    return self.answer(api.refuse, "token request refused\n", "text/plain")
                token = api.mint(audience)
                api.tokens.append(token)
                self.answer(200, token, "application/jwt")

            def address_string(self) -> str:  # a unix socket has no client address
                return "fly"

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        try:
            with _serving(Server(str(self.socket_path), Handler)):
                yield self
        finally:
            self.socket_path.unlink(missing_ok=True)


# ---- STS and IAM Credentials ----------------------------------------------------------------------------------------


@dataclass
class GoogleTokenServices:
    """STS + IAM Credentials for one provider that trusts ORG/APP and lets it impersonate SERVICE_ACCOUNT."""

    provider: str  # projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV
    service_account: str
    org: str = "acme"
    app: str = "my-onnx-app"
    access_token_lifetime: float = 3600  # of the impersonated token
    federated_token_lifetime: float = 3600  # of STS's token
    exchanges: list[dict] = field(default_factory=list)  # the STS forms received
    federated: set[str] = field(default_factory=set)
    access_tokens: dict[str, float] = field(default_factory=dict)  # issued token -> expiry (epoch seconds)
    port: int = 0
    _counter: Any = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sts_url(self) -> str:
        return f"{self.url}/v1/token"

    def exchange(self, form: dict[str, str]) -> tuple[int, dict]:
        self.exchanges.append(form)
        audience = f"//iam.googleapis.com/{self.provider}"
        if form.get("grant_type") != EXCHANGE_GRANT or form.get("subject_token_type") != JWT_TYPE:
            return 400, {"error": "invalid_request", "error_description": "Invalid grant_type or subject_token_type."}
        if form.get("audience") != audience:
            return 400, {"error": "invalid_target", "error_description": f"The target service indicated by the "
                                                                         f"\"audience\" parameters is invalid."}
        try:
            claims = jwt_claims(form.get("subject_token", ""))
        except (ValueError, IndexError):
            return 400, {"error": "invalid_grant", "error_description": "The subject token is not a JWT."}
        if claims.get("iss") != f"https://oidc.fly.io/{self.org}":
            return 400, {"error": "invalid_grant", "error_description": f"The issuer {claims.get('iss')} does not "
                                                                        "match the provider's issuer."}
        if claims.get("aud") != audience:
            return 400, {"error": "invalid_grant", "error_description": "The audience in ID Token "
                                                                        f"[{claims.get('aud')}] does not match the "
                                                                        "expected audience."}
        if claims.get("exp", 0) <= time.time():
            return 400, {"error": "invalid_grant", "error_description": "The ID Token has expired."}
        if claims.get("org_name") != self.org or claims.get("app_name") != self.app:
            return 400, {"error": "unauthorized_client",
                         "error_description": "The given credential is rejected by the attribute condition."}
        token = f"federated-{next(self._counter)}"
        self.federated.add(token)
        return 200, {"access_token": token, "issued_token_type": ACCESS_TOKEN_TYPE, "token_type": "Bearer",
                     "expires_in": self.federated_token_lifetime}

    def impersonate(self, email: str, authorization: str) -> tuple[int, dict]:
        bearer = authorization.removeprefix("Bearer ")
        if bearer not in self.federated:
            return 401, {"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                                   "status": "UNAUTHENTICATED"}}
        if email != self.service_account:
            return 403, {"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.getAccessToken' denied "
                                                           "on resource (or it may not exist).",
                                   "status": "PERMISSION_DENIED"}}
        token = f"ya29.stub-access-{next(self._counter)}"
        expiry = time.time() + self.access_token_lifetime
        self.access_tokens[token] = expiry
        expire_time = datetime.datetime.fromtimestamp(expiry, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {"accessToken": token, "expireTime": expire_time}

    def valid(self, authorization: str) -> bool:
        token = authorization.removeprefix("Bearer ")
        return self.access_tokens.get(token, 0) > time.time()

    @contextlib.contextmanager
    def serve(self) -> Iterator["GoogleTokenServices"]:
        services = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                body = self.body()
                if self.path == "/v1/token":
                    form = dict(urllib.parse.parse_qsl(body.decode()))
                    return self.answer(*services.exchange(form))
                prefix, suffix = "/v1/projects/-/serviceAccounts/", ":generateAccessToken"
                if self.path.startswith(prefix) and self.path.endswith(suffix):
                    email = urllib.parse.unquote(self.path[len(prefix):-len(suffix)])
                    return self.answer(*services.impersonate(email, self.headers.get("Authorization", "")))
                self.answer(404, {"error": {"code": 404, "message": f"no {self.path}", "status": "NOT_FOUND"}})

        with _tcp_server(Handler) as port:
            self.port = port
            yield self


# ---- a bearer-token gate in front of the storage emulator -----------------------------------------------------------


@dataclass
class BearerGate:
    """Forwards to the storage emulator only requests that carry a live token from `services`."""

    services: GoogleTokenServices
    upstream: str  # http://127.0.0.1:PORT of the emulator
    seen: list[str] = field(default_factory=list)  # the Authorization header of every request, in order
    port: int = 0

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def serve(self) -> Iterator["BearerGate"]:
        gate = self
        upstream = urllib.parse.urlsplit(self.upstream)

        class Handler(_Quiet):
            def forward(self) -> None:
                body = self.body()
                authorization = self.headers.get("Authorization", "")
                gate.seen.append(authorization)
                if not gate.services.valid(authorization):
                    return self.answer(401, {"error": {"code": 401, "message": "Invalid Credentials",
                                                       "errors": [{"reason": "authError"}]}})
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in {"content-length", "transfer-encoding", "connection"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        with _tcp_server(Handler) as port:
            self.port = port
            yield self


@contextlib.contextmanager
def _tcp_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    with _serving(server):
        yield server.server_address[1]


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    """Serve on a thread until the block ends, then stop and close the server."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
