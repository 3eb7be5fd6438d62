"""Prove that a URL serves the model: wait for /health to say `model_loaded`, then make a real prediction.

`check(url, ...)` is what every deploy target calls; the `smoke` task is the same from the command line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
from invoke import Exit, task

# What a fresh rollout answers before it serves: the proxy has no route yet, IAM has not propagated, the
# instance is starting, the model is loading. The smoke test waits through these.
TRANSIENT_STATUSES = {403, 404, 408, 425, 429, 500, 502, 503, 504}
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


class SmokeFailure(Exception):
    pass


def check(
    url: str,
    timeout: float = 600,
    token: str = "",
    sample: dict | None = None,
    expect_sha256: str = "",
    progress: Callable[[str], None] = print,
) -> SmokeResult:
    """Poll /health until the model is loaded (or failed, or `timeout`), then predict and check the answer."""
    url = url.rstrip("/")
    started = time.monotonic()
    result = SmokeResult(ok=False, url=url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(headers=headers, timeout=30, follow_redirects=False) as client:
        try:
            result.health = wait_until_loaded(client, url, started + timeout, progress)
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


def wait_until_loaded(client: httpx.Client, url: str, deadline: float, progress: Callable[[str], None]) -> dict:
    delay, last = 0.5, ""
    while True:
        try:
            response = client.get(f"{url}/health")
            body = _json_or_none(response)
            if response.status_code == 200 and body and body.get("model_loaded") is True:
                progress(f"ready: model loaded in {body.get('load_seconds')}s (sha256 {body['model'].get('sha256')})")
                return body
            if body and body.get("status") == "failed":
                raise SmokeFailure(f"the model failed to load: {body.get('error')}")
            if response.status_code == 401:
                raise SmokeFailure("the service requires authentication: pass --token, or --identity-token for Cloud Run")
            if response.status_code not in TRANSIENT_STATUSES:
                raise SmokeFailure(f"/health answered {response.status_code}: {response.text[:300]}")
            state = f"{response.status_code} " + (f"{body.get('status')} ({body.get('step')})" if body else "")
        except httpx.TransportError as exc:
            state = f"not answering ({type(exc).__name__})"
        if time.monotonic() + delay > deadline:
            raise SmokeFailure(f"timed out: /health never reported model_loaded (last: {state.strip()})")
        if state != last:
            progress(f"waiting: {state.strip()}")
            last = state
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def sample_request(metadata: dict) -> dict:
    """One row for every input, built from the model's own metadata (free dimensions become 1)."""
    import numpy as np

    inputs = {}
    for spec in metadata["inputs"]:
        dtype = np.dtype(spec["dtype"])
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        inputs[spec["name"]] = np.full(shape, FILL[dtype.kind], dtype=dtype).tolist()
    return {"inputs": inputs}


def predict_and_check(client: httpx.Client, url: str, metadata: dict, request: dict) -> dict[str, list[int]]:
    import numpy as np

    response = client.post(f"{url}/predict", json=request)
    if response.status_code != 200:
        raise SmokeFailure(f"/predict answered {response.status_code}: {response.text[:300]}")
    outputs = (_json_or_none(response) or {}).get("outputs")
    if not isinstance(outputs, dict):
        raise SmokeFailure(f"/predict answered without an \"outputs\" object: {response.text[:300]}")
    shapes = {}
    for spec in metadata["outputs"]:
        if spec["name"] not in outputs:
            raise SmokeFailure(f"/predict left out output {spec['name']!r}")
        shape = list(np.shape(outputs[spec["name"]]))
        expected = spec["shape"]
        if len(shape) != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected, shape)):
            raise SmokeFailure(f"output {spec['name']!r} has shape {shape}; the model declares {expected}")
        shapes[spec["name"]] = shape
    return shapes


def get_json(client: httpx.Client, url: str) -> dict:
    response = client.get(url)
    body = _json_or_none(response)
    if response.status_code != 200 or body is None:
        raise SmokeFailure(f"{url} answered {response.status_code}: {response.text[:300]}")
    return body


def _json_or_none(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def after_deploy(c, url: str, token: str = "") -> SmokeResult:
    """The smoke test as every deploy target runs it: timeout and expected sha256 from config, progress and
    verdict printed. The caller decides what a failure means for its platform."""
    print(f"smoke test: {url}")
    result = check(url, timeout=float(c.smoke.timeout), token=token, expect_sha256=c.model.sha256)
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
        "sample": "JSON file with a /predict body; default: one row built from /metadata",
        "sha256": "fail unless the served model has this sha256 (default: model.sha256)",
        "json": "print the result as JSON (for CI)",
    }
)
def smoke(c, url, timeout=None, token="", identity_token=False, sample="", sha256="", json=False):
    """Wait until URL serves the model, make a real prediction and check it."""
    if identity_token:
        token = gcloud_identity_token(c)
    result = check(
        url,
        timeout=float(timeout or c.smoke.timeout),
        token=token,
        sample=load_sample(sample or c.smoke.sample),
        expect_sha256=sha256 or c.model.sha256,
        progress=(lambda _: None) if json else print,
    )
    report(result, as_json=json)
