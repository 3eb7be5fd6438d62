"""Prove that a URL serves the model: wait for /health to say `model_loaded`, then make a real prediction.

`check(url, ...)` is what every deploy target calls; the `smoke` task is the same from the command line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
from invoke import Exit, task

# What a fresh rollout answers before it serves: the proxy has no route yet, IAM has not propagated, the
# instance is starting, the model is loading. The smoke test waits through these.
TRANSIENT_STATUSES = {403, 404, 408, 425, 429, 500, 502, 503, 504}
API_KEY_VARIABLE = "ONNX_SERVE_API_KEY"
NEEDS_KEY = (f"the service needs an API key (its API_KEYS): set smoke.api_key or {API_KEY_VARIABLE}, or pass "
             "--api-key; `invoke fly.api-key` makes one")
FILL = {"f": 0.5, "i": 1, "u": 1, "b": False}


@dataclass
class SmokeResult:
    ok: bool
    url: str
    reason: str = ""
    seconds: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)  # output name -> shape
    load: dict[str, Any] = field(default_factory=dict)  # the load's final figures: bytes, seconds, rate
    build: dict[str, Any] = field(default_factory=dict)  # what image serves: /health's revision, version, created


class LoadProgress:
    """Shows a model download as it goes: one live line on a terminal (bytes, percent, rate, elapsed), plain lines
    every `every` seconds otherwise (CI logs), nothing at all when `show` is None (--json)."""

    def __init__(self, show: Callable[[str], None] | None, live: bool | None = None, every: float = 10.0):
        self.show, self.every = show, every
        self.live = sys.stdout.isatty() if live is None else live
        self.started = time.monotonic()
        self.samples: list[tuple[float, int]] = []  # (when, bytes done), to measure the rate
        self.printed_at = float("-inf")  # the first figures show at once
        self.open_line = False

    def update(self, step: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        self.samples = [(t, b) for t, b in self.samples if now - t <= 5.0] + [(now, done)]
        if self.show is None:
            return
        text = self.describe(step, done, total, now)
        if self.live:
            sys.stdout.write("\r\x1b[2K" + text)
            sys.stdout.flush()
            self.open_line = True
        elif now - self.printed_at >= self.every:
            self.show(text)
            self.printed_at = now

    def describe(self, step: str, done: int, total: int | None, now: float) -> str:
        (first_at, first_bytes), (last_at, last_bytes) = self.samples[0], self.samples[-1]
        rate = (last_bytes - first_bytes) / (last_at - first_at) if last_at > first_at else 0.0
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        size = f"{_mb(done)} of {_mb(total)}" if total else _mb(done)
        return f"{step}: {size}{percent} at {_mb(rate)}/s, {now - self.started:.0f}s elapsed"

    def close(self) -> None:
        if self.open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open_line = False


def _mb(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def download_progress(health: dict) -> tuple[int, int | None] | None:
    """(bytes done, bytes total) of the model's download, as /health reports it while loading."""
    progress = health.get("progress")
    if not isinstance(progress, dict) or not isinstance(progress.get("bytes_done"), int):
        return None
    total = progress.get("bytes_total")
    return progress["bytes_done"], total if isinstance(total, int) else None


class SmokeFailure(Exception):
    pass


def check(
    url: str,
    timeout: float = 600,
    token: str = "",
    sample: dict | None = None,
    expect_sha256: str = "",
    progress: Callable[[str], None] | None = print,
    api_key: str = "",
) -> SmokeResult:
    """Poll /health until the model is loaded (or failed, or `timeout`), then predict and check the answer."""
    url = url.rstrip("/")
    started = time.monotonic()
    result = SmokeResult(ok=False, url=url)
    with httpx.Client(headers=auth_headers(token, api_key), timeout=30, follow_redirects=False) as client:
        try:
            result.health = wait_until_loaded(client, url, started + timeout, progress)
            result.load = load_figures(result.health)
            result.build = result.health.get("build") or {}
            sha = result.health.get("model", {}).get("sha256")
            if expect_sha256 and sha != expect_sha256:
                raise SmokeFailure(f"the service runs model sha256 {sha}, expected {expect_sha256}")
            metadata = get_json(client, f"{url}/metadata")
            result.request = sample or sample_request(metadata)
            result.outputs = predict_and_check(client, url, metadata, result.request)
            result.ok = True
        except SmokeFailure as exc:
            result.reason = str(exc)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def auth_headers(token: str, api_key: str) -> dict[str, str]:
    """The platform's token (Cloud Run's IAM identity token) in Authorization; the service's API key beside it in
    X-API-Key, or alone as `Authorization: Bearer KEY` (a Fly app)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if api_key:
        headers.update({"X-API-Key": api_key} if token else {"Authorization": f"Bearer {api_key}"})
    return headers


def configured_api_key(c) -> str:
    """The key the deploys' smoke tests send: smoke.api_key, else ONNX_SERVE_API_KEY from the environment (a
    secret is better kept out of invoke.yaml)."""
    return c.smoke.api_key or os.environ.get(API_KEY_VARIABLE, "")


@dataclass(frozen=True)
class Access:
    """How a task reaches the service: the platform's identity token (a private Cloud Run service) and the service's
    API key (its API_KEYS), together. Every task that calls the service gets it from `access`."""

    token: str = ""
    api_key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return auth_headers(self.token, self.api_key)


def access(c, target: str) -> Access:
    """The way into TARGET's service from the settings: `gcloud auth print-identity-token` for a private Cloud Run
    service (cloudrun.public false), and smoke.api_key / ONNX_SERVE_API_KEY for the service's API key."""
    token = gcloud_identity_token(c) if target == "cloudrun" and not c.cloudrun.public else ""
    return Access(token, configured_api_key(c))


def load_figures(health: dict) -> dict[str, Any]:
    """The finished load in numbers: bytes fetched, seconds to ready, average rate."""
    seconds = health.get("load_seconds")
    done = download_progress(health)
    size = done[0] if done else (health.get("model") or {}).get("size_bytes")
    figures: dict[str, Any] = {"seconds": seconds, "bytes": size}
    if isinstance(size, int) and isinstance(seconds, (int, float)) and seconds > 0:
        figures["bytes_per_second"] = round(size / seconds)
    return figures


def wait_until_loaded(
    client: httpx.Client, url: str, deadline: float, progress: Callable[[str], None] | None, live: bool | None = None
) -> dict:
    loading = LoadProgress(progress, live)
    try:
        return _poll_health(client, url, deadline, progress or (lambda _: None), loading)
    finally:
        loading.close()


def _poll_health(
    client: httpx.Client, url: str, deadline: float, progress: Callable[[str], None], loading: LoadProgress
) -> dict:
    delay, last = 0.5, ""
    while True:
        try:
            response = client.get(f"{url}/health")
            body = _json_or_none(response)
            if response.status_code == 200 and body and body.get("model_loaded") is True:
                loading.close()
                progress(f"ready: model loaded in {body.get('load_seconds')}s (sha256 {body['model'].get('sha256')})")
                return body
            if body and body.get("status") == "failed":
                raise SmokeFailure(f"the model failed to load: {body.get('error')}")
            if response.status_code == 401:
                raise SmokeFailure("the service requires authentication: pass --token, or --identity-token for Cloud "
                                   f"Run, or an API key (--api-key, smoke.api_key or {API_KEY_VARIABLE})")
            if response.status_code not in TRANSIENT_STATUSES:
                raise SmokeFailure(f"/health answered {response.status_code}: {response.text[:300]}")
            state = f"{response.status_code} " + (f"{body.get('status')} ({body.get('step')})" if body else "")
            downloading = download_progress(body) if body else None
        except httpx.TransportError as exc:
            state, downloading = f"not answering ({type(exc).__name__})", None
        if time.monotonic() + delay > deadline:
            raise SmokeFailure(f"timed out: /health never reported model_loaded (last: {state.strip()})")
        if state != last:
            loading.close()
            progress(f"waiting: {state.strip()}")
            last = state
        if downloading:
            loading.update(str(body.get("step")), *downloading)
            delay = 1.0  # a download in progress: keep the figures fresh
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def sample_request(metadata: dict, rows: int = 1, rng: Any = None) -> dict:
    """A request for every input, built from the model's own metadata: `rows` rows when the first dimension is free
    (other free dimensions 1). Values are one plain valid value of each kind, or with `rng` (a numpy Generator)
    seeded random ones: normal floats, integers 0-9, booleans, one of a few short strings."""
    import numpy as np

    inputs = {}
    for spec in metadata["inputs"]:
        shape = [d if isinstance(d, int) else (rows if axis == 0 else 1) for axis, d in enumerate(spec["shape"])]
        if spec["dtype"] == "string":
            values = rng.choice(np.array(["a", "b", "c"], dtype=object), shape) if rng else np.full(shape, "a", object)
            inputs[spec["name"]] = values.tolist()
            continue
        dtype = np.dtype(spec["dtype"])
        if rng is None:
            values = np.full(shape, FILL[dtype.kind], dtype=dtype)
        elif dtype.kind == "f":
            values = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            values = rng.random(shape) < 0.5
        else:
            values = rng.integers(0, 10, shape).astype(dtype)
        inputs[spec["name"]] = values.tolist()
    return {"inputs": inputs}


def predict_and_check(client: httpx.Client, url: str, metadata: dict, request: dict) -> dict[str, list[int]]:
    import numpy as np

    response = client.post(f"{url}/predict", json=request)
    _refuse_unauthorized(response)
    if response.status_code != 200:
        raise SmokeFailure(f"/predict answered {response.status_code}: {response.text[:300]}")
    outputs = (_json_or_none(response) or {}).get("outputs")
    if not isinstance(outputs, dict):
        raise SmokeFailure(f"/predict answered without an \"outputs\" object: {response.text[:300]}")
    shapes = {}
    for spec in metadata["outputs"]:
        if spec["name"] not in outputs:
            raise SmokeFailure(f"/predict left out output {spec['name']!r}")
        if spec["dtype"].startswith(("seq(", "map(", "optional(")):  # skl2onnx's ZipMap: a list of {label: p}
            shapes[spec["name"]] = [len(outputs[spec["name"]])] if isinstance(outputs[spec["name"]], list) else []
            continue
        shape = list(np.shape(outputs[spec["name"]]))
        expected = spec["shape"]
        if len(shape) != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected, shape)):
            raise SmokeFailure(f"output {spec['name']!r} has shape {shape}; the model declares {expected}")
        shapes[spec["name"]] = shape
    return shapes


def get_json(client: httpx.Client, url: str) -> dict:
    response = client.get(url)
    _refuse_unauthorized(response)
    body = _json_or_none(response)
    if response.status_code != 200 or body is None:
        raise SmokeFailure(f"{url} answered {response.status_code}: {response.text[:300]}")
    return body


def _refuse_unauthorized(response: httpx.Response) -> None:
    if response.status_code == 401:
        sent = "X-API-Key" in response.request.headers or "Authorization" in response.request.headers
        raise SmokeFailure(f"{response.request.url.path} answered 401: " + (
            "the API key sent is not one of the service's API_KEYS" if sent else NEEDS_KEY))


def _json_or_none(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def after_deploy(c, url: str, reach: Access | None = None, sample: dict | None = None) -> SmokeResult:
    """The smoke test as every deploy and release runs it: timeout and expected sha256 from config, the way in from
    `access` (default: the API key alone, for a local service), progress and verdict printed. The caller decides
    what a failure means for its platform."""
    reach = reach or Access(api_key=configured_api_key(c))
    print(f"smoke test: {url}")
    result = check(url, timeout=float(c.smoke.timeout), token=reach.token, sample=sample,
                   expect_sha256=c.model.sha256, api_key=reach.api_key)
    if result.ok:
        print(f"smoke test passed in {result.seconds}s: outputs {result.outputs}")
    return result


def report(result: SmokeResult, as_json: bool = False) -> None:
    """Print the verdict, and raise Exit (non-zero) when the smoke test failed."""
    if as_json:
        print(json.dumps(asdict(result), indent=2))
    elif result.ok:
        print(f"PASS {result.url}: model loaded, prediction shapes {result.outputs} ({result.seconds}s)")
    else:
        print(f"FAIL {result.url}: {result.reason} ({result.seconds}s)")
    if not result.ok:
        raise Exit(code=1)


def gcloud_identity_token(c) -> str:
    """An identity token for a private Cloud Run service, from the gcloud account."""
    result = c.run("gcloud auth print-identity-token", hide=True, warn=True)
    if not result.ok:
        raise Exit(f"`gcloud auth print-identity-token` failed: run `gcloud auth login` first.\n{result.stderr}")
    return result.stdout.strip()


def load_sample(path: str) -> dict | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise Exit(f"cannot read the sample request {path}: {exc}; it must be a JSON body for /predict") from None


@task(
    help={
        "url": "base URL of the service, e.g. https://onnx-serve-abc-uc.a.run.app",
        "timeout": "seconds to wait for model_loaded (default: smoke.timeout)",
        "token": "bearer token to send (private services)",
        "identity_token": "send `gcloud auth print-identity-token` (private Cloud Run services)",
        "api_key": f"the service's API key (default: smoke.api_key, else ${API_KEY_VARIABLE}); beside a token it "
        "goes in X-API-Key",
        "sample": "JSON file with a /predict body; default: one row built from /metadata",
        "sha256": "fail unless the served model has this sha256 (default: model.sha256)",
        "json": "print the result as JSON (for CI)",
    }
)
def smoke(c, url, timeout=None, token="", identity_token=False, api_key="", sample="", sha256="", json=False):
    """Wait until URL serves the model, make a real prediction and check it."""
    if identity_token:
        token = gcloud_identity_token(c)
    result = check(
        url,
        timeout=float(timeout or c.smoke.timeout),
        token=token,
        sample=load_sample(sample or c.smoke.sample),
        expect_sha256=sha256 or c.model.sha256,
        progress=None if json else print,
        api_key=api_key or configured_api_key(c),
    )
    report(result, as_json=json)
