"""Headless Chromium from Debian's package, driven over the Chrome DevTools protocol: a page to open, JavaScript
to run in it, text to type as a user types it, and every URL the page asked for.

Chromium is installed with apt-get when missing (root on Debian); elsewhere the test skips, or fails under
ONNX_SERVE_REQUIRE_TOOLS=1. The browser runs with its background services off, so the only requests it makes are
the page's; it is stopped by PID.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import websocket

from tests.support.debian_packages import ensure_installed
from tests.support.processes import stop
from tests.support.waiting import wait_for

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-default-apps", "--remote-debugging-port=0",
]  # fmt: skip


class Page:
    """One tab, over its DevTools websocket."""

    def __init__(self, socket: websocket.WebSocket):
        self.socket = socket
        self.ids = itertools.count(1)
        self.requested: list[str] = []  # every URL the page asked for (Network.requestWillBeSent)
        self.call("Network.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict:
        """Send one DevTools command and return its result; events read meanwhile are recorded."""
        id_ = next(self.ids)
        self.socket.send(json.dumps({"id": id_, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("method") == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
            if message.get("id") == id_:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30, what: str = "") -> Any:
        """The value of `expression` once it is truthy."""
        return wait_for(lambda: self.evaluate(expression), timeout, interval=0.1, what=what or expression)

    def click(self, selector: str, timeout: float = 30) -> None:
        """Click the first element matching `selector`, once there is one."""
        found = f"document.querySelector({json.dumps(selector)})"
        self.wait(f"!!{found}", timeout, what=f"{selector} to appear")
        self.evaluate(f"{found}.scrollIntoView(); {found}.click(); true")

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type `text` as keystrokes would (the page's own input handlers see it)."""
        self.wait(f"!!document.querySelector({json.dumps(selector)})", what=f"{selector} to appear")
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus(); true")
        self.call("Input.insertText", text=text)


@contextlib.contextmanager
def chromium() -> Iterator[Page]:
    """A fresh headless Chromium (its own profile in a temp dir) and its first tab."""
    binary = ensure_installed("chromium", "chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            wait_for(lambda: process.poll() is None and port_file.is_file() and port_file.read_text().strip(), 60,
                     what="Chromium's DevTools port")  # fmt: skip
            port = int(port_file.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            tab = next(t for t in targets if t["type"] == "page")
            socket = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
            try:
                yield Page(socket)
            finally:
                socket.close()
        finally:
            stop(process)
            time.sleep(0.2)  # let the profile's files close before the temp dir goes
