"""Start and stop the processes tests run, always by PID, always ended."""

from __future__ import annotations

import os
import signal
import subprocess


def stop(process: subprocess.Popen, grace: float = 10.0) -> int:
    """TERM the process (group), wait up to `grace`, then KILL; returns its exit code."""
    if process.poll() is None:
        _signal(process, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL)
            process.wait(5)
    return process.returncode


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # started with start_new_session: the group holds its children too
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass

