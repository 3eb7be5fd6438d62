# The SBOM of a built image (`invoke image.build` runs this right after the image): CycloneDX JSON of the image's
# Python environment, made inside a throw-away copy of the image by cyclonedx-bom, which never ships in the image.
ARG BASE_IMAGE=python:3.12-slim
ARG IMAGE=onnx-serve:latest

# The generator in a venv of its own, on the image's base: cached across builds of the service, hash-locked.
FROM ${BASE_IMAGE} AS generator
ARG PIP_INDEX_URL
COPY requirements-sbom.txt /tmp/requirements-sbom.txt
RUN python -m venv --without-pip /opt/sbom \
    && python -m pip --python /opt/sbom/bin/python install --no-cache-dir --only-binary=:all: --require-hashes \
        -r /tmp/requirements-sbom.txt

# Run against the image's own interpreter: what it lists is what /usr/local holds, pip and the base's packages too.
FROM ${IMAGE}
USER 0
COPY --from=generator /opt/sbom /opt/sbom
RUN /opt/sbom/bin/cyclonedx-py environment --spec-version 1.5 --output-format JSON --output-file /sbom.cdx.json \
        /usr/local/bin/python3

# The service image runs as its app user; only the throw-away copy above needed root.
USER 10001:10001
