# The inference service's image, for Cloud Run and Fly.io: `invoke image.build` builds it.
# Both platforms run linux/amd64 images; build with --platform linux/amd64 on other machines.

# A build arg so that tests, mirrors and pinned digests can swap the base without editing this file.
# `invoke image.build` passes NAME@sha256:DIGEST (image.base_image pinned, or the digest a tag resolved to).
ARG BASE_IMAGE=python:3.12-slim

# Builder: only wheels (every requirement ships one for this Python), so no compiler is ever needed and
# nothing but the installed packages reaches the runtime image. Every file must match a sha256 the lock
# records (`invoke deps.lock`): a replaced wheel on the index or a mirror fails the build.
FROM ${BASE_IMAGE} AS builder
# For networks that reach PyPI only through a mirror: --build-arg PIP_INDEX_URL=https://mirror/simple.
# Unset unless given, so the base image's own pip configuration (PyPI by default) applies.
ARG PIP_INDEX_URL
COPY requirements.txt /tmp/requirements.txt
# Then what the service never imports goes (27 MB of the 219 MB installed): numpy's test suites and f2py,
# onnxruntime's model conversion, quantization and transformer-optimization tools.
RUN pip install --prefix=/install --no-cache-dir --no-warn-script-location --only-binary=:all: --require-hashes \
        -r /tmp/requirements.txt \
    && find /install -depth -type d \( -path '*/site-packages/numpy/tests' -o -path '*/site-packages/numpy/*/tests' \
        -o -path '*/site-packages/numpy/f2py' -o -path '*/site-packages/onnxruntime/transformers' \
        -o -path '*/site-packages/onnxruntime/tools' -o -path '*/site-packages/onnxruntime/quantization' \
        -o -path '*/site-packages/onnxruntime/datasets' -o -path '*/site-packages/onnxruntime/backend' \) \
        -exec rm -rf {} +

FROM ${BASE_IMAGE}
# Log lines reach Cloud Logging / `fly logs` as they are written; the root filesystem may be read-only,
# so Python must not try to write bytecode at run time (pip already compiled the dependencies).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed, unprivileged uid: what Kubernetes-style runAsNonRoot checks and volume permissions can rely on.
RUN groupadd --gid 10001 app \
    && useradd --no-log-init --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app

# Dependencies before code: a change to service/ reuses this layer instead of reinstalling.
COPY --from=builder /install /usr/local

WORKDIR /app
COPY service/ ./service/

# What was built, for /health's "build" (and `invoke status`, the smoke test's --json). Last, so that a new
# commit rebuilds no layer above; the same values are the image's OCI labels (org.opencontainers.image.*).
ARG BUILD_REVISION=""
ARG BUILD_VERSION=""
ARG BUILD_CREATED=""
ENV BUILD_REVISION=${BUILD_REVISION} \
    BUILD_VERSION=${BUILD_VERSION} \
    BUILD_CREATED=${BUILD_CREATED}

# The app user owns nothing in the image; it writes only to /tmp (model cache) and /dev/shm (gunicorn's
# heartbeat), both of which Cloud Run and Fly back with memory.
USER 10001:10001
# Cloud Run sends traffic to $PORT (8080 unless told otherwise); Fly to internal_port = 8080.
EXPOSE 8080
# Exec form: gunicorn is PID 1 and receives the platform's SIGTERM itself, then drains in-flight requests.
CMD ["gunicorn", "--config", "service/gunicorn.conf.py", "service.app:app"]
