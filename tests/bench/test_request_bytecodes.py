"""`python -m bench.request_bytecodes`, the count docs/benchmarks.md gives for the request path: it runs, and counts
the service's own functions and the floor's, each request's share, with the harness taken off."""

import re
import subprocess
import sys

from tests.support.models import ROOT


def test_the_bytecode_count_names_the_service_and_floor_functions_per_request():
    done = subprocess.run([sys.executable, "-m", "bench.request_bytecodes", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    totals = dict(re.findall(r"^(service|floor): (\d+)$", done.stdout, re.MULTILINE))
    assert set(totals) == {"service", "floor"}
    assert int(totals["floor"]) > 0 and int(totals["service"]) > int(totals["floor"])  # the service checks more
    assert "Endpoint.handle (service/app.py)" in done.stdout and "app (bench/floor_app.py)" in done.stdout
    assert "gather" not in done.stdout  # the harness's own bytecodes are taken off
