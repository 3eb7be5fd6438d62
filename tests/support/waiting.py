"""The one way tests wait for a state they need (a load, a flush, a signal's effect): poll with a bound, and say
what did not happen when the bound is reached. A test never asserts on such a state before waiting for it."""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Call `predicate` until it returns a true value, and return that value; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_loaded(app: Any, timeout: float = 30) -> None:
    """Wait until an in-process app's model load has ended, either way (ready or failed): its /health, /predict
    and metrics show the outcome from then on. A TestClient starts the load; it does not wait for it."""
    if not app.state.store.loaded.wait(timeout):
        raise TimeoutError(f"timed out after {timeout}s waiting for the model load to end: {app.state.store.health()}")
