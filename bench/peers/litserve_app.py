"""LitServe serving the same ONNX model with its batching on, one inference worker and one HTTP server.

Run by the bench from LitServe's own virtual environment (bench/venvs.py), from the project's root:
`python -m bench.peers.litserve_app MODEL_PATH PORT MAX_BATCH_SIZE BATCH_TIMEOUT_SECONDS`. It takes and answers
the same JSON as the service's /predict, one row per request; /health answers 200 once the worker is ready.
"""

import sys

import litserve as ls
import numpy as np
import onnxruntime as ort

from bench.runtime_probe import report_every_config


class OnnxAPI(ls.LitAPI):
    def __init__(self, model_path: str, **batching):
        super().__init__(**batching)
        self.model_path = model_path

    def setup(self, device):
        self.session = ort.InferenceSession(self.model_path, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def decode_request(self, request):
        (row,) = request["inputs"]["features"]
        return np.asarray(row, dtype=np.float32)

    def batch(self, rows):
        return np.stack(rows)

    def predict(self, features):
        return self.session.run(None, {"features": features})

    def unbatch(self, outputs):
        return [[output[i : i + 1] for output in outputs] for i in range(len(outputs[0]))]

    def encode_response(self, outputs):
        return {"outputs": {name: value.tolist() for name, value in zip(self.output_names, outputs)}}


if __name__ == "__main__":
    model_path, port, max_batch_size, batch_timeout = sys.argv[1:5]
    report_every_config()
    api = OnnxAPI(model_path, max_batch_size=int(max_batch_size), batch_timeout=float(batch_timeout))
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=int(port), num_api_servers=1, generate_client_file=False)
