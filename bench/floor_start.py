"""The cold-start floor: a bare Python process that fetches the model and opens a session, nothing else.

`python bench/floor_start.py gs://BUCKET/DIR/model.onnx DIR [READERS]` (STORAGE_EMULATOR_HOST set) or `... PATH DIR`;
prints "ready" once the session is open. READERS 1 (default): the model object in one stream. READERS > 1: every
object beside the model (its external data too) with READERS concurrent ranged reads each, through the client's
transfer manager on threads, as `gcloud storage cp` slices a large object, and the session opens as the service
opens it (a large file's weights mapped from it, not copied: onnxruntime's default open of a 1 GB one-file model
takes 10-15 s here, the mapped one 0.2 s). No web server, no settings, no checks beyond the client's own crc32c of
a whole-object read.
"""

import os
import sys
from pathlib import Path

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
options, model = onnxruntime.SessionOptions(), path
if readers > 1:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from service.onnx_file import with_weights_by_reference  # only protobuf walking and mmap: light to import

    options.add_session_config_entry("session.disable_prepacking", "1")
    mapped = with_weights_by_reference(Path(path), 64 * 1024)
    if mapped:
        model = mapped
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.path.dirname(path))
onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
print("ready", flush=True)
