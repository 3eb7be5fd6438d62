import pytest

from service.settings import SettingsError, available_cpus, load_settings, parse_model_uri

DEMO = "models/demo.onnx"


def test_minimal_environment_gives_documented_defaults():
    settings = load_settings({"MODEL_URI": DEMO})
    assert (settings.port, settings.host, settings.web_concurrency) == (8080, "0.0.0.0", 1)
    assert settings.graceful_timeout < 10  # inside Cloud Run's SIGTERM-to-SIGKILL window
    assert settings.source.path.name == "demo.onnx"


def test_empty_port_means_default():
    assert load_settings({"MODEL_URI": DEMO, "PORT": ""}).port == 8080


@pytest.mark.parametrize(
    "uri, bucket, name, generation",
    [
        ("gs://my-models/resnet/model.onnx", "my-models", "resnet/model.onnx", None),
        ("gs://my-models/model.onnx#1712345678901234", "my-models", "model.onnx", 1712345678901234),
    ],
)
def test_gcs_uris_parse_with_optional_generation(uri, bucket, name, generation):
    source = parse_model_uri(uri)
    assert (source.bucket, source.name, source.generation) == (bucket, name, generation)


@pytest.mark.parametrize(
    "env, names",
    [
        ({}, ["MODEL_URI", "gs://"]),
        ({"MODEL_URI": "gs://bucket-only"}, ["MODEL_URI", "gs://BUCKET/PATH"]),
        ({"MODEL_URI": "s3://b/model.onnx"}, ["MODEL_URI", "only gs://"]),
        ({"MODEL_URI": "/nonexistent/model.onnx"}, ["MODEL_URI", "existing local file"]),
        ({"MODEL_URI": DEMO, "MODEL_SHA256": "abc"}, ["MODEL_SHA256", "64 hex digits", "sha256sum"]),
        ({"MODEL_URI": DEMO, "MODEL_SHA256": "model.onnx=abc"}, ["MODEL_SHA256", "model.onnx=HEX,model.onnx.data=HEX"]),
        ({"MODEL_URI": DEMO, "WARMUP_INPUT": '{"inputs": [1,'}, ["WARMUP_INPUT", "not valid JSON", '{"inputs"']),
        ({"MODEL_URI": DEMO, "WARMUP_INPUT": '{"instances": []}'}, ["WARMUP_INPUT", '"inputs" key']),
        ({"MODEL_URI": DEMO, "WARMUP_INPUT": "gs://b"}, ["WARMUP_INPUT", "gs://BUCKET/PATH/example.json"]),
        ({"MODEL_URI": DEMO, "PORT": "http"}, ["PORT", "'http'"]),
        ({"MODEL_URI": DEMO, "PORT": "70000"}, ["PORT", "65535"]),
        ({"MODEL_URI": DEMO, "WEB_CONCURRENCY": "0"}, ["WEB_CONCURRENCY"]),
        ({"MODEL_URI": DEMO, "LOG_LEVEL": "loud"}, ["LOG_LEVEL", "'debug'"]),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(env, names):
    with pytest.raises(SettingsError) as error:
        load_settings(env)
    for fragment in names:
        assert fragment in str(error.value)


def test_sha256_is_normalised_to_lowercase():
    digest = "AB" * 32
    assert load_settings({"MODEL_URI": DEMO, "MODEL_SHA256": digest}).model_sha256 == digest.lower()


def test_threads_split_the_container_cpus_between_workers():
    cpus = available_cpus()
    assert 1 <= cpus <= len(__import__("os").sched_getaffinity(0))
    one = load_settings({"MODEL_URI": DEMO})
    assert one.intra_op_threads == cpus
    many = load_settings({"MODEL_URI": DEMO, "WEB_CONCURRENCY": str(cpus * 2)})
    assert many.intra_op_threads == 1
    assert load_settings({"MODEL_URI": DEMO, "ORT_INTRA_OP_THREADS": "3"}).intra_op_threads == 3


def test_model_sha256_is_one_digest_or_one_per_file():
    digest, other = "ab" * 32, "cd" * 32
    assert load_settings({"MODEL_URI": DEMO, "MODEL_SHA256": digest.upper()}).sha256_by_file == {"": digest}
    manifest = load_settings({"MODEL_URI": DEMO, "MODEL_SHA256": f"model.onnx={digest}, weights/w.bin={other.upper()}"})
    assert manifest.sha256_by_file == {"model.onnx": digest, "weights/w.bin": other}
    assert load_settings({"MODEL_URI": DEMO}).sha256_by_file == {}
