"""The sliced download (service/gcs_download.py) through the pacing stand-in (tests/support/storage_throttle.py) and
the real emulator, with the real client: ranged reads several at a time, a failed or broken slice retried by
itself, an object replaced mid-way, altered bytes, a server without Range, a sha256 that does not match."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from service.model_store import LoadState, ModelStore
from service.settings import SettingsError, load_settings
from tests.support.models import large_model, linear_model, reference_outputs
from tests.support.waiting import wait_for
from tests.support.storage_throttle import throttled_storage
from tests.support.zoo import external_data_model

BUCKET = "sliced"
SLICE = 256 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A single-file model of about 3 MB: a dozen slices of 256 KiB."""
    return large_model(tmp_path_factory.mktemp("sliced") / "model.onnx", 3)


@pytest.fixture
def storage(emulator, monkeypatch):
    """The stand-in in front of the session's emulator, unpaced unless a test sets a rate; the service reads
    through it."""
    with throttled_storage(emulator) as throttle:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", throttle.host)
        yield throttle


def load(uri: str, tmp_path, **env: str) -> ModelStore:
    settings = {"MODEL_URI": uri, "MODEL_CACHE_DIR": str(tmp_path / "cache"), "MODEL_LOAD_DEADLINE": "20",
                "MODEL_DOWNLOAD_SLICE_BYTES": str(SLICE), **env}  # fmt: skip
    store = ModelStore(load_settings(settings))
    store.load()
    return store


def upload(storage, name: str, path) -> int:
    """Through the stand-in, as a user's upload reaches the bucket."""
    from google.cloud import storage as gcs

    bucket = gcs.Client(project="test").bucket(BUCKET)
    if not bucket.exists():
        bucket.create()
    blob = bucket.blob(name)
    blob.upload_from_filename(str(path))
    blob.reload()
    return blob.generation


def served_file(store: ModelStore, tmp_path) -> bytes:
    (path,) = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix == ".onnx"]
    return path.read_bytes()


def test_a_large_model_arrives_as_concurrent_ranged_reads_byte_exact(storage, model, tmp_path):
    upload(storage, "one/model.onnx", model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    store = load(f"gs://{BUCKET}/one/model.onnx", tmp_path, MODEL_SHA256=digest)
    assert store.status.state is LoadState.READY, store.status.error
    size = model.stat().st_size
    assert storage.ranged_reads == -(-size // SLICE) > 8
    assert served_file(store, tmp_path) == model.read_bytes()
    health = store.health()
    assert health["model"]["sha256"] == digest
    assert health["progress"] == {"bytes_done": size, "bytes_total": size, "files": 1, "files_done": 1}
    assert {"download", "verify", "session", "warm_up"} <= set(health["load_steps"])
    rows = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(store.run({"features": rows})[0], reference_outputs(model, {"features": rows})[0], rtol=1e-5)


@pytest.mark.slow
def test_several_reads_run_at_once_and_beat_one_paced_stream(storage, model, tmp_path):
    upload(storage, "paced/model.onnx", model)
    storage.rate, storage.first_byte_delay = 2e6, 0.02  # 2 MB/s per connection: one stream takes 1.5 s
    started = time.perf_counter()
    sliced = load(f"gs://{BUCKET}/paced/model.onnx", tmp_path / "a")
    sliced_seconds = time.perf_counter() - started
    started = time.perf_counter()
    single = load(f"gs://{BUCKET}/paced/model.onnx", tmp_path / "b", MODEL_DOWNLOAD_CONCURRENCY="1")
    single_seconds = time.perf_counter() - started
    assert sliced.ready and single.ready
    assert storage.ranged_reads == -(-model.stat().st_size // SLICE)  # the second load: one request, no range
    # What a user sees: the model is in much sooner (at 8 readers, 8x the bandwidth; asserted loosely).
    assert sliced_seconds < single_seconds / 2, (sliced_seconds, single_seconds)


def test_a_slice_that_fails_once_is_retried_by_itself(storage, model, tmp_path):
    upload(storage, "retry/model.onnx", model)
    storage.fail_ranged = {3}  # a 503
    storage.break_ranged = {5}  # half its bytes, then the connection drops: the client resumes from there
    store = load(f"gs://{BUCKET}/retry/model.onnx", tmp_path, MODEL_SHA256=hashlib.sha256(model.read_bytes()).hexdigest())
    assert store.status.state is LoadState.READY, store.status.error
    assert served_file(store, tmp_path) == model.read_bytes()
    slices = -(-model.stat().st_size // SLICE)
    assert storage.ranged_reads == slices + 2  # two retries, each of one slice (or its rest), nothing else
    assert store.status.attempts == 2  # counted on /health


def test_altered_bytes_fail_the_crc32c_and_the_model_is_never_served(storage, model, tmp_path):
    upload(storage, "corrupt/model.onnx", model)
    storage.corrupt_offset = 5 * SLICE + 17
    store = load(f"gs://{BUCKET}/corrupt/model.onnx", tmp_path)
    assert store.status.state is LoadState.FAILED
    assert "crc32c mismatch" in store.status.error and f"gs://{BUCKET}/corrupt/model.onnx" in store.status.error
    assert not list((tmp_path / "cache").rglob("*.onnx"))  # no file left to be taken for the model
    assert store.unavailable().startswith("the model failed to load")


def test_a_server_without_range_support_gets_one_stream(storage, model, tmp_path):
    upload(storage, "norange/model.onnx", model)
    storage.ranges = False
    store = load(f"gs://{BUCKET}/norange/model.onnx", tmp_path)
    assert store.status.state is LoadState.READY, store.status.error
    assert served_file(store, tmp_path) == model.read_bytes()
    assert storage.media_reads - storage.ranged_reads == 1  # the fallback: one read without a range


@pytest.mark.slow
def test_a_model_replaced_mid_download_is_never_mixed(storage, emulator, model, tmp_path):
    """The object is overwritten while its slices are read: the load starts again on the new generation and serves
    exactly the new bytes, or, with MODEL_URI pinned to the old generation, fails saying what changed."""
    other = large_model(tmp_path / "other.onnx", 3, seed=1)
    first = upload(storage, "moving/model.onnx", model)
    storage.rate = 0.2e6  # 0.2 MB/s per connection: the download takes about two seconds

    def replaced_mid_way(uri: str) -> ModelStore:
        store = ModelStore(load_settings({
            "MODEL_URI": uri, "MODEL_CACHE_DIR": str(tmp_path / "cache" / uri[-4:]), "MODEL_LOAD_DEADLINE": "20",
            "MODEL_DOWNLOAD_SLICE_BYTES": str(SLICE),
        }))  # fmt: skip
        thread = store.start()
        wait_for(lambda: store.status.progress.as_json()["bytes_done"] > SLICE, 20, what="the download under way")
        upload(storage, "moving/model.onnx", other if uri.endswith("model.onnx") else model)
        storage.rate = 0  # the new generation arrives quickly
        thread.join(60)
        return store

    store = replaced_mid_way(f"gs://{BUCKET}/moving/model.onnx")
    assert store.status.state is LoadState.READY, store.status.error
    assert store.status.generation != first
    cached = [p for p in (tmp_path / "cache").rglob("*.onnx") if str(store.status.generation) in str(p.parent)]
    assert [p.read_bytes() == other.read_bytes() for p in cached] == [True]
    assert store.status.sha256 == hashlib.sha256(other.read_bytes()).hexdigest()

    current = upload(storage, "moving/model.onnx", model)
    storage.rate = 0.2e6
    pinned = replaced_mid_way(f"gs://{BUCKET}/moving/model.onnx#{current}")
    assert pinned.status.state is LoadState.FAILED
    assert f"generation {current} was replaced or deleted during the download" in pinned.status.error
    assert "pin a generation that stays" in pinned.status.error


def test_external_data_files_arrive_sliced_too(storage, tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    model = external_data_model(folder, megabytes=2.0)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for file in files:
        upload(storage, f"ext/{file.relative_to(folder)}", file)
    store = load(f"gs://{BUCKET}/ext/{model.name}", tmp_path)
    assert store.status.state is LoadState.READY, store.status.error
    assert storage.ranged_reads > len(files)
    for data in store.status.data_files:
        assert data["sha256"] == hashlib.sha256((folder / data["name"]).read_bytes()).hexdigest()


def test_a_sha256_mismatch_still_refuses_the_sliced_model(storage, model, tmp_path):
    upload(storage, "wrongsha/model.onnx", model)
    store = load(f"gs://{BUCKET}/wrongsha/model.onnx", tmp_path, MODEL_SHA256="0" * 64)
    assert store.status.state is LoadState.FAILED
    assert "sha256 mismatch" in store.status.error and storage.ranged_reads > 1
    assert store.session is None


def test_a_small_model_keeps_the_single_request(storage, tmp_path):
    small = linear_model(tmp_path / "small.onnx")
    upload(storage, "small/model.onnx", small)
    store = load(f"gs://{BUCKET}/small/model.onnx", tmp_path, MODEL_DOWNLOAD_SLICE_BYTES="0")
    assert store.ready and storage.ranged_reads == 0 and storage.media_reads == 1


def test_a_bad_download_setting_stops_start_up_naming_it():
    with pytest.raises(SettingsError, match=r"MODEL_DOWNLOAD_CONCURRENCY: Input should be greater than or equal to 1"):
        load_settings({"MODEL_URI": "gs://models/m.onnx", "MODEL_DOWNLOAD_CONCURRENCY": "0"})
    with pytest.raises(SettingsError, match=r"MODEL_DOWNLOAD_SLICE_BYTES must be 0 \(chosen by size\) or at least 65536"):
        load_settings({"MODEL_URI": "gs://models/m.onnx", "MODEL_DOWNLOAD_SLICE_BYTES": "1000"})
