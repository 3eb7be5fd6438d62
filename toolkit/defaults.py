"""Defaults for every setting the tasks read: `invoke.yaml` beside tasks.py, then INVOKE_* variables, then
flags override them (Invoke's own config tree; see docs/configuration.md)."""

from pathlib import Path

DEFAULTS = {
    "model": {
        # gs://bucket/path/model.onnx[#generation] or a local file; the bundled demo model by default.
        "uri": "models/demo.onnx",
        "sha256": "",
    },
    "image": {
        "name": "onnx-serve",
        "tag": "",  # empty: the git commit (short sha, with -dirty when the tree has changes)
        "base_image": "python:3.12-slim",
        "platform": "linux/amd64",  # what Cloud Run runs
        "registry": "",  # empty: taken from the target (Artifact Registry or registry.fly.io)
        "pip_index_url": "",  # empty: PyPI; a mirror's simple index for builds that cannot reach PyPI
        "build_network": "",  # empty: Docker's default; "host" for engines without a bridge network
        # supply chain (docs/image.md, "Supply chain")
        "source": "",  # org.opencontainers.image.source; empty: the git remote origin
        "sbom_dir": "build/sbom",  # where each build's CycloneDX SBOM goes (relative to the project); empty: none
        "allow_dirty": False,  # push images built from uncommitted changes to Artifact Registry / Fly
        "max_severity": "HIGH",  # image.scan fails on a finding above this (LOW, MEDIUM, HIGH, CRITICAL)
        "scan_allowlist": "scan-allowlist.txt",  # accepted findings, one CVE id per line with a reason after `#`
        "scan_flags": "",  # more flags for `gcloud artifacts docker images scan`, e.g. --location=europe
    },
    "deploy": {
        "require_scan": False,  # cloudrun: scan the pushed image (image.scan) and deploy only when it passes
    },
    "gcp": {
        "project": "",
        "region": "us-central1",
        "repository": "onnx-serve",  # Artifact Registry docker repository
        # `invoke gcp.setup` creates it; Cloud Run and Fly run as ID@PROJECT.iam.gserviceaccount.com
        "runtime_account": "onnx-serve-runtime",
        "deployer": "",  # IAM member allowed to deploy as the runtime account; empty: gcloud's active account
        "wif_pool": "fly",  # workload identity pool for Fly machines (gcp.setup --fly)
        "wif_provider": "",  # its OIDC provider; empty: fly-APP
    },
    "cloudrun": {
        "service": "onnx-serve",
        "build": "local",  # local (docker) or cloudbuild (gcloud builds submit, no docker needed)
        "cpu": "2",
        "memory": "2Gi",
        "concurrency": 16,
        "min_instances": 0,
        "max_instances": 10,
        "timeout": "60s",
        "service_account": "",  # empty: the runtime account gcp.setup creates (gcp.runtime_account)
        "public": False,
        "startup_probe_seconds": 600,  # how long the model may take to load before Cloud Run gives up
        "declarative": False,  # deploy by `gcloud run services replace` of the rendered manifest, not flags
        "manifest": "service.yaml",  # where `invoke render` and declarative deploys write the Knative service
        "model_mount": False,  # mount the model's bucket read-only (Cloud Storage volume) instead of downloading
        # a Secret Manager secret holding API_KEYS (comma-separated keys), given to the service as that variable;
        # empty: none set by the deploy (IAM alone guards a private service)
        "api_keys_secret": "",
    },
    "fly": {
        "app": "",  # region, VM size, checks and scaling live in fly.toml
        "config": "fly.toml",
        "url": "",  # what the smoke test calls; empty: https://APP.fly.dev
        "build": "remote",  # remote (Fly's builder) or image (push the local build)
        "org": "",  # Fly organisation slug: the token issuer https://oidc.fly.io/ORG (gcp.setup --fly)
        # printed by `invoke gcp.setup --fly`; when set, the app reads the bucket keyless (no key secret needed)
        "workload_identity_provider": "",
    },
    "local": {
        "runtime": "auto",  # docker when an engine answers, else process (gunicorn on this machine)
        "port": 8080,
    },
    "release": {
        # Gates of `invoke model.compare` (and the compare `invoke release` runs): None or "" is no gate.
        "max_abs_diff": None,  # largest |candidate - baseline| allowed in any numeric output
        "min_agreement": None,  # least arg-max / exact agreement of any output, a fraction (0.99)
        "max_latency_ratio": None,  # largest candidate/baseline single-row p50 or p99
        # `invoke release`: a new model on the serving image, compared, then traffic in steps
        "samples": "",  # JSONL file of /predict bodies for the compare, the smoke test and the answers check
        "steps": "10,50,100",  # Cloud Run: percents of traffic to the new model; 100 promotes it
        "step_wait": 600,  # Cloud Run: seconds each step serves before it is judged
        "window": 300,  # seconds of Cloud Monitoring figures (the end of the step) a step is judged on; >= 300
        "ingestion_delay": 180,  # seconds Cloud Monitoring takes to show a sample: waited out after each step
        "max_5xx_share": 0.01,  # roll back when the new model's share of 5xx answers is over this (and the stable's)
        "max_p99_ratio": 1.5,  # roll back when its p99 latency is over this times the stable revision's
        "min_requests": 100,  # fewer requests to the new model in a step's window: hold the split, do not promote
        "monitoring_endpoint": "https://monitoring.googleapis.com",  # Cloud Monitoring's REST API (tests: a stand-in)
        "monitoring_timeout": 30,  # seconds to wait for each Cloud Monitoring answer; then the release goes back
        "record": "",  # the invoke.yaml whose model.uri/sha256 a release updates; empty: `-f FILE`, else the project's
    },
    "optimize": {
        # `invoke model.optimize` (docs/optimizing.md); its gates are release.max_abs_diff and friends above
        "out": "",  # where the chosen model goes (local path or gs://); empty: beside the model, NAME.CANDIDATE.onnx
        "candidates": "optimized,int8-dynamic,int8-static",  # which to try (toolkit/optimize.py CANDIDATES)
        "speed_seconds": 2.0,  # seconds of each of the single-row and 64-row timings, per candidate
    },
    "smoke": {
        "timeout": 600,
        "sample": "",  # JSON file with a request body; empty: built from the model's /metadata
        "api_key": "",  # one of the service's API_KEYS, sent by every smoke test; empty: $ONNX_SERVE_API_KEY
    },
    "tune": {
        # `invoke tune` (docs/sizing.md): measure each shape under load, recommend settings, price a million predictions
        "target": "cloudrun",
        "p99_ms": 250,  # the objective a recommended point must meet
        "cloudrun_shapes": "1:2Gi,2:4Gi,4:8Gi",  # CPU:MEMORY, as Cloud Run offers them
        "fly_shapes": "shared-cpu-2x:2gb,performance-1x:2gb",  # VM size:memory
        "samples": "",  # JSONL of /predict bodies; empty: the seeded requests model.compare makes from the metadata
        "image": "",  # empty: the image `invoke image.build` makes for this commit
        # auto: Docker when an engine answers, else the service under gunicorn in a cgroup per shape (root);
        # docker or process to insist on one
        "runtime": "auto",
        "step_seconds": 5,  # each concurrency step is measured this long...
        "warmup_seconds": 1,  # ...after this much load that does not count
        "max_concurrency": 256,  # the sweep stops here at the latest
        "levels": "",  # fixed concurrencies (e.g. "8") instead of the sweep 1, 2, 4, ...
        "out": "",  # the JSON document; empty: build/tune/tune-TARGET.json (the plot goes beside it)
        "record": "",  # the invoke.yaml --write edits; empty: the project's
        "prices": {},  # overrides of toolkit/prices.py, same keys (e.g. a negotiated vCPU-second price)
    },
}


def config_path(c) -> Path:
    """The invoke.yaml Invoke read for this run: `invoke -f FILE`, else the project's (the file the tasks that
    record something, `release` and `tune --write`, edit unless their own setting names another)."""
    for loaded in (getattr(c.config, "_runtime_path", None), getattr(c.config, "_project_path", None)):
        if loaded:
            return Path(loaded)
    return Path(getattr(c.config, "_project_prefix", None) or "./") / "invoke.yaml"
