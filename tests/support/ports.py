"""Ports for the servers tests start, chosen so that a port picked here is not lost before its server binds it.

A port the kernel hands out for bind(0) comes from the ephemeral range (ip_local_port_range, 32768-60999 by
default), which every outgoing connection on the machine also draws from: between our pick and gunicorn's bind,
any connect() could take it. So ports are picked below that range, where only listeners that ask for a number
go; each pytest-xdist worker (and the controller or a plain run) draws from its own slice, so that two workers
never pick the same port; and a port is handed out only after a bind shows it free now, and not twice in one
process while the slice has others (a service that just stopped may still hold its port in TIME_WAIT).
"""

from __future__ import annotations

import os
import random
import socket

LOW, HIGH = 20000, 32768  # below the default ephemeral range
SLICES = 8  # gw0 .. gw6 (more workers share), and one for a run without xdist: about 1,600 ports each
_given: set[int] = set()


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3" under `pytest -n`, unset otherwise
    index = int(worker[2:]) % (SLICES - 1) if worker.startswith("gw") else SLICES - 1
    width = (HIGH - LOW) // SLICES
    return range(LOW + index * width, LOW + (index + 1) * width)


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, out of the ephemeral range and this worker's own."""
    fresh = [port for port in _slice() if port not in _given]
    if not fresh:
        _given.clear()
        fresh = list(_slice())
    random.shuffle(fresh)  # two runs side by side on one machine rarely meet
    for port in fresh:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port left in {_slice()}")
