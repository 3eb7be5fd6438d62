"""The cold-start floor: a bare Python process that fetches the model and opens a session, nothing else.

`python bench/floor_start.py gs://BUCKET/OBJECT DIR` (STORAGE_EMULATOR_HOST set) or `... PATH DIR`; prints
"ready" once the session is open. No web server, no settings, no checks beyond the client's own crc32c.
"""

import sys

import google.cloud.storage
import onnxruntime

uri, directory = sys.argv[1], sys.argv[2]
if uri.startswith("gs://"):
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    path = f"{directory}/model.onnx"
    google.cloud.storage.Client().bucket(bucket).blob(name).download_to_filename(path)
else:
    path = uri
onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
print("ready", flush=True)
