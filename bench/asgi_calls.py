"""One POST /predict as an ASGI call, without a server: what the in-process request-path tools
(bench/request_steps.py, bench/request_bytecodes.py) feed the service's app and the floor's, over and over."""

from __future__ import annotations

from typing import Any, Awaitable, Callable


def predict_call(body: bytes, *extra_headers: tuple[bytes, bytes]) -> tuple[
    Callable[[], dict], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]
]:
    """(scope, receive, send) for POST /predict with `body` whole in one message: `scope()` a fresh scope per
    call (the app may write to it), `receive` the body, `send` raising on any answer but 200."""
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra_headers]  # fmt: skip
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict:
        return message

    async def send(sent: dict) -> None:
        if sent["type"] == "http.response.start" and sent["status"] != 200:
            raise RuntimeError(f"answered {sent['status']}")

    def scope() -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "path": "/predict", "raw_path": b"/predict", "query_string": b"", "headers": headers,
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http"}  # fmt: skip

    return scope, receive, send
