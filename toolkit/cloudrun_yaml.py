"""The Cloud Run service as a Knative `service.yaml` (serving.knative.dev/v1, what `gcloud run services replace`
applies): the same image, env, resources, concurrency, scaling, CPU boost, probe, timeout, service account and
execution environment that the flag deploy sets, from the same config and values (`cloudrun_spec.py`).

The no-traffic candidate of a deploy is a named template plus a traffic list that keeps the serving revisions and
tags the new one at 0% (the YAML equivalent of `--no-traffic --tag`).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from invoke import Context, Exit

from toolkit import cloudrun_spec
from toolkit.gcp import model_bucket, runtime_account


def seconds(duration: str) -> int:
    """gcloud's duration form (`60s`, `10m`, `1h2m3s`, or bare seconds) as the API's whole seconds."""
    text = str(duration).strip()
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or not parts:
        raise Exit(f"cloudrun.timeout {duration!r} is not a duration: use e.g. 60s, 10m or 1h.")
    hours, minutes, secs = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def manifest(c: Context, image_ref: str, model_mount: bool = False, revision: str | None = None,
             traffic: list[dict] | None = None) -> dict:
    """The Service object; `revision` names the template and `traffic` routes requests (default: all to latest)."""
    cr = c.cloudrun
    annotations = {
        "autoscaling.knative.dev/minScale": str(cr.min_instances),
        "autoscaling.knative.dev/maxScale": str(cr.max_instances),
        "run.googleapis.com/startup-cpu-boost": "true",
        "run.googleapis.com/execution-environment": "gen2",  # network file systems (the model mount) need gen2
    }
    container = {
        "image": image_ref,
        "ports": [{"name": "http1", "containerPort": cloudrun_spec.PORT}],
        "env": [{"name": k, "value": v} for k, v in cloudrun_spec.env_vars(c, model_mount).items()]
        + ([{"name": "API_KEYS", "valueFrom": {"secretKeyRef": {"name": cr.api_keys_secret, "key": "latest"}}}]
           if cr.api_keys_secret else []),
        "resources": {"limits": {"cpu": str(cr.cpu), "memory": str(cr.memory)}},
        "startupProbe": cloudrun_spec.probe(c),
    }
    spec = {
        "containerConcurrency": int(cr.concurrency),
        "timeoutSeconds": seconds(cr.timeout),
        "serviceAccountName": runtime_account(c),
        "containers": [container],
    }
    if model_mount:
        container["volumeMounts"] = [{"name": cloudrun_spec.VOLUME, "mountPath": cloudrun_spec.MOUNT_PATH}]
        spec["volumes"] = [{"name": cloudrun_spec.VOLUME,
                            "csi": {"driver": "gcsfuse.run.googleapis.com", "readOnly": True,
                                    "volumeAttributes": {"bucketName": model_bucket(c)}}}]
    template = {"metadata": {"annotations": annotations}, "spec": spec}
    if revision:
        template["metadata"]["name"] = revision
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": cr.service, "labels": {"cloud.googleapis.com/location": c.gcp.region}},
        "spec": {"template": template, "traffic": traffic or [{"percent": 100, "latestRevision": True}]},
    }


def candidate_traffic(existing: dict, revision: str, tag: str) -> list[dict]:
    """Keep every current target (LATEST pinned to the revision it resolves to) and add the candidate at 0%."""
    latest = existing.get("status", {}).get("latestReadyRevisionName")
    kept = []
    for target in existing.get("spec", {}).get("traffic", []):
        if target.get("tag") == tag:
            continue
        entry = {k: v for k, v in target.items() if k in {"percent", "revisionName", "tag"}}
        if target.get("latestRevision"):
            entry["revisionName"] = latest
        kept.append(entry)
    return [*kept, {"revisionName": revision, "tag": tag}]


def dump(service: dict) -> str:
    return yaml.safe_dump(service, sort_keys=False, default_flow_style=False)


def write(path: str | Path, service: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Rendered by `invoke render --target cloudrun` from invoke.yaml; apply with\n"
                    f"# gcloud run services replace {path.name} --region REGION\n" + dump(service))
    return path
