"""Throughput of /predict with API_KEYS off and on, the demo model, one worker: `python -m bench.api_keys`.

The two services run side by side and are loaded in alternating rounds, so that whatever else the machine does
weighs on both alike; the figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.loadgen import request_bytes, run_load
from bench.servers import SERVICE_APP, gunicorn
from tests.support.models import DEMO_MODEL

KEYS = "bench-key-0000000000000001,bench-key-0000000000000002,bench-key-0000000000000003"
BODY = b'{"inputs": {"features": [[5.1, 3.5, 1.4, 0.2]]}}'


def main(rounds: int, seconds: float, clients: int) -> None:
    plain = request_bytes("POST", "/predict", BODY)
    keyed = request_bytes("POST", "/predict", BODY, headers={"Authorization": "Bearer bench-key-0000000000000003"})
    figures: dict[str, list[float]] = {"keys off": [], "keys on (3 keys, Bearer)": []}
    with tempfile.TemporaryDirectory() as logs, \
            gunicorn(SERVICE_APP, str(DEMO_MODEL), Path(logs)) as off, \
            gunicorn(SERVICE_APP, str(DEMO_MODEL), Path(logs), API_KEYS=KEYS) as on:  # fmt: skip
        off.wait_ready()
        on.wait_ready()
        for round_ in range(rounds):
            pairs = list(zip(figures.values(), [(off, plain), (on, keyed)]))
            for rates, (server, request) in pairs[:: 1 if round_ % 2 else -1]:  # each goes first every other round
                result = run_load(server.port, request, clients, seconds)
                if result.errors:
                    raise SystemExit(f"{result.errors} requests failed on port {server.port}")
                rates.append(result.requests_per_second)
    for name, rates in figures.items():
        print(f"{name:28} median {statistics.median(rates):7.0f} req/s  rounds {[round(r) for r in rates]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per service")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of load per round")
    parser.add_argument("--clients", type=int, default=8, help="keep-alive connections")
    options = parser.parse_args()
    main(options.rounds, options.seconds, options.clients)
