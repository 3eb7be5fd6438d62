"""The cold-start floor: a bare Python process that fetches the model and opens a session, nothing else.

`python bench/floor_start.py gs://BUCKET/DIR/model.onnx DIR [READERS]` (STORAGE_EMULATOR_HOST set) or `... PATH DIR`;
prints "ready" once the session is open. READERS 1 (default): the model object in one stream. READERS > 1: every
object beside the model (its external data too) with READERS concurrent ranged reads each, through the client's
transfer manager on threads, as `gcloud storage cp` slices a large object. No web server, no settings, no checks
beyond the client's own crc32c of a whole-object read.
"""

import sys

import google.cloud.storage
import onnxruntime
from google.cloud.storage import transfer_manager

uri, directory = sys.argv[1], sys.argv[2]
readers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
if uri.startswith("gs://"):
    bucket_name, _, name = uri.removeprefix("gs://").partition("/")
    bucket = google.cloud.storage.Client().bucket(bucket_name)
    path = f"{directory}/model.onnx"
    if readers == 1:
        bucket.blob(name).download_to_filename(path)
    else:
        folder = name.rpartition("/")[0]
        for blob in bucket.list_blobs(prefix=f"{folder}/" if folder else None):
            transfer_manager.download_chunks_concurrently(
                blob, f"{directory}/{blob.name.removeprefix(folder).lstrip('/')}", chunk_size=-(-blob.size // readers),
                worker_type=transfer_manager.THREAD, max_workers=readers, crc32c_checksum=False,
            )  # fmt: skip
else:
    path = uri
onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
print("ready", flush=True)
