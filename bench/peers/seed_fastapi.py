"""A FastAPI app written the way the seed articles show: a pydantic request model and a plain `def` endpoint that
calls session.run (FastAPI runs it in its thread pool). The bench serves it with the service's own gunicorn config
and Uvicorn worker: `gunicorn -c service/gunicorn.conf.py bench.peers.seed_fastapi:app`, MODEL_URI a local path.

It takes and answers the same JSON as the service's /predict, for the demo model and the MLP alike (one float
input named "features").
"""

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

session = ort.InferenceSession(os.environ["MODEL_URI"], providers=["CPUExecutionProvider"])
output_names = [output.name for output in session.get_outputs()]
app = FastAPI()


class PredictRequest(BaseModel):
    inputs: dict[str, list[list[float]]]


@app.get("/health")
def health():
    return {"model_loaded": True}


@app.post("/predict")
def predict(request: PredictRequest):
    features = np.array(request.inputs["features"], dtype=np.float32)
    outputs = session.run(None, {"features": features})
    return {"outputs": {name: value.tolist() for name, value in zip(output_names, outputs)}}
