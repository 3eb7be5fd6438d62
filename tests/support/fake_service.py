"""A stand-in of the service's HTTP API with behaviour a test chooses (a wrong output shape, a bearer token it
requires), for the smoke test's own checks. The real service is used wherever its real behaviour is wanted."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

HEALTH = {"status": "ready", "model_loaded": True, "step": "serving", "load_seconds": 0.1,
          "model": {"uri": "gs://b/m.onnx", "generation": 1, "sha256": "ab" * 32, "size_bytes": 10}, "error": None}
METADATA = {"inputs": [{"name": "features", "dtype": "float32", "shape": ["N", 4]}],
            "outputs": [{"name": "scores", "dtype": "float32", "shape": ["N", 3]}]}


@contextlib.contextmanager
def fake_service(outputs=None, token: str = "") -> Iterator[tuple[str, list]]:
    """Serve HEALTH/METADATA and answer /predict with `outputs`; yields (url, received requests)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if token and self.headers.get("authorization") != f"Bearer {token}":
                # Cloud Run answers 403 to a request without a valid identity token.
                self._answer(403, {"error": "forbidden"})
                return False
            return True

        def do_GET(self):
            received.append({"path": self.path, "authorization": self.headers.get("authorization")})
            if self._authorized():
                self._answer(200, HEALTH if self.path == "/health" else METADATA)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            received.append({"path": self.path, "body": body})
            if self._authorized():
                self._answer(200, {"outputs": outputs if outputs is not None else {"scores": [[0.1, 0.2, 0.7]]}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
