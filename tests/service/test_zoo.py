"""Models of every kind users bring (tests/support/zoo.py), served from the storage emulator by a real gunicorn:
/metadata as onnxruntime reads the model, /predict equal to onnxruntime in-process, bad input a 4xx naming the
input. Then what is particular to models with external data and to the warm-up, in-process where no process
boundary is at stake."""

from __future__ import annotations

import hashlib
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.model_store import LoadState, ModelStore
from service.settings import load_settings
from tests.service.test_app import client_for
from tests.support.models import reference_outputs
from tests.support.storage_throttle import throttled_storage
from tests.support.waiting import wait_for
from tests.support.server import run_service
from tests.support.zoo import MIN_FRAMES, ZOO, external_data_model, min_length_model

BUCKET = "zoo"
# What /metadata calls onnxruntime's types (docs/api.md, "Supported models").
DTYPE_NAMES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(int16)": "int16", "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(string)": "string",
}  # fmt: skip


@pytest.fixture(scope="module")
def zoo(emulator, tmp_path_factory):
    """Every zoo model and its data files, made once and uploaded under gs://zoo/KIND/; {kind: local folder}."""
    root = tmp_path_factory.mktemp("zoo")
    folders = {}
    for kind, model in ZOO.items():
        folders[kind] = folder = root / kind
        folder.mkdir()
        model.make(folder)
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                emulator.upload(BUCKET, f"{kind}/{file.relative_to(folder)}", file)
    return folders


@pytest.fixture
def storage_env(emulator, monkeypatch):
    """In-process loads read the emulator through the real client, as the service does under gunicorn."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    return emulator


def described(arg) -> dict:
    return {"name": arg.name, "dtype": DTYPE_NAMES.get(arg.type, arg.type), "shape": list(arg.shape)}


def assert_same(got, expected) -> None:
    """An answer's output against onnxruntime's: arrays by value and shape, skl2onnx's lists of {label: p} by row."""
    if isinstance(expected, list):  # ZipMap: JSON object keys are strings
        assert len(got) == len(expected)
        for got_row, row in zip(got, expected):
            assert set(got_row) == {str(label) for label in row}
            np.testing.assert_allclose([got_row[str(label)] for label in row], list(row.values()), rtol=1e-6)
    elif expected.dtype.kind in "fc":
        assert np.shape(got) == expected.shape
        # atol: the service turns prepacking off for external data, which sums in another order
        np.testing.assert_allclose(np.array(got, dtype=np.float64), expected.astype(np.float64), rtol=1e-6, atol=1e-5)
    else:
        assert got == expected.tolist()


@pytest.mark.parametrize("kind", ZOO)
def test_every_kind_of_model_is_served_from_gcs_as_onnxruntime_runs_it(kind, zoo, emulator, tmp_path):
    model, folder = ZOO[kind], zoo[kind]
    path = folder / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with run_service(f"gs://{BUCKET}/{kind}/model.onnx", tmp_path, **emulator.env) as service:
        health = service.wait_state("ready")

        files = [file for file in folder.rglob("*") if file.is_file()]
        total = sum(file.stat().st_size for file in files)
        assert health["progress"] == {"bytes_done": total, "bytes_total": total, "files": len(files), "files_done": len(files)}
        assert health["model"]["size_bytes"] == total
        data_files = sorted(str(file.relative_to(folder)) for file in files if file != path)
        assert sorted(f["name"] for f in health["model"]["data_files"]) == data_files

        if model.guessed_warm_up_fails:
            (warning,) = health["warnings"]
            assert "WARMUP_INPUT" in warning
            assert any(line["severity"] == "WARNING" and "WARMUP_INPUT" in line["message"] for line in service.log_lines())
        else:
            assert health["warnings"] == []

        metadata = httpx.get(service.url + "/metadata").json()
        assert metadata["inputs"] == [described(arg) for arg in session.get_inputs()]
        assert metadata["outputs"] == [described(arg) for arg in session.get_outputs()]

        response = service.predict({"inputs": model.inputs})
        assert response.status_code == 200, response.text
        feeds = {name: np.array(value, dtype=model.dtypes[name]) for name, value in model.inputs.items()}
        outputs = response.json()["outputs"]
        assert list(outputs) == [arg.name for arg in session.get_outputs()]
        for got, expected in zip(outputs.values(), reference_outputs(path, feeds)):
            assert_same(got, expected)

        for inputs, fragments in model.bad:
            response = service.predict({"inputs": inputs})
            assert 400 <= response.status_code < 500, response.text
            for fragment in fragments:
                assert fragment in response.json()["detail"], (inputs, response.json()["detail"])


def _upload_folder(emulator, folder, bucket, skip=()) -> None:
    for file in sorted(folder.rglob("*")):
        name = str(file.relative_to(folder))
        if file.is_file() and name not in skip:
            emulator.upload(bucket, f"m/{name}", file)


def test_a_missing_external_data_file_fails_the_load_naming_it(storage_env, tmp_path):
    external_data_model(tmp_path)
    _upload_folder(storage_env, tmp_path, "zoo-missing", skip={"weights/w2.bin"})
    client = client_for("gs://zoo-missing/m/model.onnx", MODEL_CACHE_DIR=str(tmp_path / "cache"))
    try:
        response = client.get("/health")
        assert response.status_code == 503
        error = response.json()["error"]
        assert "'weights/w2.bin' is missing" in error and "gs://zoo-missing/m/weights/w2.bin" in error
    finally:
        client.__exit__(None, None, None)


def test_external_data_is_memory_mapped_from_the_cache_not_copied(storage_env, tmp_path):
    external_data_model(tmp_path / "model", megabytes=4)
    _upload_folder(storage_env, tmp_path / "model", "zoo-mapped")
    cache = tmp_path / "cache"
    store = ModelStore(load_settings({"MODEL_URI": "gs://zoo-mapped/m/model.onnx", "MODEL_CACHE_DIR": str(cache)}))
    store.load()
    assert store.status.state is LoadState.READY, store.status.error
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if str(cache) in line}
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert mapped >= {str(folder / "model.onnx.data"), str(folder / "weights" / "w2.bin")}
    del store


def test_a_data_file_overwritten_in_the_bucket_is_fetched_again(storage_env, tmp_path):
    path = external_data_model(tmp_path / "model")
    _upload_folder(storage_env, tmp_path / "model", "zoo-overwrite")
    settings = load_settings({"MODEL_URI": "gs://zoo-overwrite/m/model.onnx", "MODEL_CACHE_DIR": str(tmp_path / "c")})
    rows = np.ones((1, 8), np.float32)
    first = ModelStore(settings)
    first.load()
    w2 = tmp_path / "model" / "weights" / "w2.bin"
    w2.write_bytes(np.random.default_rng(9).standard_normal(w2.stat().st_size // 4).astype(np.float32).tobytes())
    generation = storage_env.upload("zoo-overwrite", "m/weights/w2.bin", w2)
    second = ModelStore(settings)
    second.load()
    assert second.status.state is LoadState.READY, second.status.error
    assert {f["name"]: f["generation"] for f in second.health()["model"]["data_files"]}["weights/w2.bin"] == generation
    before, after = first.run({"features": rows})[0], second.run({"features": rows})[0]
    (expected,) = reference_outputs(path, {"features": rows})  # the model as its files are now
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_health_shows_bytes_and_step_while_downloading(emulator, tmp_path):
    external_data_model(tmp_path / "model", megabytes=48)
    _upload_folder(emulator, tmp_path / "model", "zoo-progress")
    total = sum(f.stat().st_size for f in (tmp_path / "model").rglob("*") if f.is_file())
    seen = []

    def loaded() -> bool:
        answer = service.health()
        if answer:
            body = answer[1]
            seen.append((body["step"], body["progress"]["bytes_done"], body["progress"]["bytes_total"]))
        return bool(answer) and answer[1]["status"] != "loading"

    # Paced as Cloud Storage paces a stream (1 MB/s a connection: about 6 s for the 48 MB over 8 ranged reads), so
    # that the download is still under way when the service first answers, however long gunicorn takes to start.
    with throttled_storage(emulator, rate=1_000_000) as storage, \
            run_service("gs://zoo-progress/m/model.onnx", tmp_path, STORAGE_EMULATOR_HOST=storage.host) as service:
        wait_for(loaded, 60, interval=0.01, what="the load to end")
        assert service.health()[1]["status"] == "ready"
    midway = [(step, done) for step, done, of in seen if of == total and 0 < done < total]
    assert midway and all(step.startswith("downloading") for step, _ in midway), seen
    done = [done for _, done, _ in seen]
    assert done == sorted(done) and done[-1] == total  # never goes back, ends complete


def test_sha256_manifest_covers_every_file_of_the_model(storage_env, tmp_path):
    external_data_model(tmp_path / "model")
    _upload_folder(storage_env, tmp_path / "model", "zoo-manifest")
    digests = {
        str(f.relative_to(tmp_path / "model")): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in (tmp_path / "model").rglob("*") if f.is_file()
    }  # fmt: skip
    wrong = dict(digests, **{"weights/w2.bin": "0" * 64})
    partial = {name: digest for name, digest in digests.items() if name != "weights/w2.bin"}
    cases = [
        (digests, "ready", []),
        (wrong, "failed", ["sha256 mismatch", "'weights/w2.bin'"]),
        (partial, "failed", ["MODEL_SHA256", "has none for ['weights/w2.bin']"]),
    ]
    for manifest, state, fragments in cases:
        sha256 = ",".join(f"{name}={digest}" for name, digest in manifest.items())
        client = client_for("gs://zoo-manifest/m/model.onnx", MODEL_SHA256=sha256, MODEL_CACHE_DIR=str(tmp_path / "c"))
        try:
            body = client.get("/health").json()
            assert body["status"] == state, body["error"]
            for fragment in fragments:
                assert fragment in body["error"]
        finally:
            client.__exit__(None, None, None)


def test_a_model_with_external_data_on_a_local_path(tmp_path):
    path = external_data_model(tmp_path / "model")
    client = client_for(path)
    try:
        assert client.get("/health").json()["status"] == "ready"
        rows = [[1.0] * 8]
        (expected,) = reference_outputs(path, {"features": np.array(rows, np.float32)})
        assert_same(client.post("/predict", json={"inputs": rows}).json()["outputs"]["scores"], expected)
    finally:
        client.__exit__(None, None, None)
    (tmp_path / "model" / "weights" / "w2.bin").unlink()
    client = client_for(path)
    try:
        error = client.get("/health").json()["error"]
        assert "'weights/w2.bin' is missing" in error
    finally:
        client.__exit__(None, None, None)


def test_external_data_outside_the_model_folder_is_refused_with_the_reason(tmp_path):
    import onnx

    path = external_data_model(tmp_path / "model")
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[1].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere/w2.bin"
    onnx.save(model, path)
    client = client_for(path)
    try:
        error = client.get("/health").json()["error"]
        assert "'../elsewhere/w2.bin'" in error and "outside its own folder" in error
    finally:
        client.__exit__(None, None, None)


LONG_ENOUGH = json.dumps({"inputs": {"audio": [[0.5] * MIN_FRAMES]}})
TOO_SHORT = json.dumps({"inputs": {"audio": [[0.5] * (MIN_FRAMES - 1)]}})


@pytest.mark.parametrize(
    "given, state, fragments",
    [
        (LONG_ENOUGH, "ready", []),
        ("FILE", "ready", []),
        (TOO_SHORT, "failed", ["failed its warm-up inference on WARMUP_INPUT", "Reshape"]),
        ('{"inputs": {"sound": [[1.0]]}}', "failed", ["WARMUP_INPUT is not a valid request", "unknown input 'sound'"]),
        ("/nonexistent/warmup.json", "failed", ["WARMUP_INPUT /nonexistent/warmup.json cannot be read"]),
    ],
)
def test_warmup_input_is_run_before_ready_and_its_failure_fails_the_load(given, state, fragments, tmp_path):
    if given == "FILE":
        given = tmp_path / "warmup.json"
        given.write_text(LONG_ENOUGH)
    client = client_for(min_length_model(tmp_path), WARMUP_INPUT=str(given))
    try:
        body = client.get("/health").json()
        assert body["status"] == state, body
        assert body["warnings"] == []
        for fragment in fragments:
            assert fragment in body["error"]
    finally:
        client.__exit__(None, None, None)


def test_warmup_input_from_gcs(storage_env, tmp_path):
    storage_env.upload("zoo-warmup", "warmup.json", TOO_SHORT.encode())
    client = client_for(min_length_model(tmp_path), WARMUP_INPUT="gs://zoo-warmup/warmup.json")
    try:
        body = client.get("/health").json()
        assert body["status"] == "failed" and "WARMUP_INPUT" in body["error"]
    finally:
        client.__exit__(None, None, None)


def test_an_input_json_cannot_express_fails_the_load_naming_it(tmp_path):
    from onnx import TensorProto, helper

    from tests.support.models import _save

    graph = helper.make_graph(
        [helper.make_node("Cast", ["half"], ["y"], to=TensorProto.FLOAT)], "bf16",
        [helper.make_tensor_value_info("half", TensorProto.BFLOAT16, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )  # fmt: skip
    client = client_for(_save(graph, tmp_path / "bf16.onnx"))
    try:
        body = client.get("/health").json()
        assert body["status"] == "failed"
        assert "input 'half' has type tensor(bfloat16)" in body["error"]
    finally:
        client.__exit__(None, None, None)
