"""The batching scheduler's path for a request alone in the worker (service/scheduler.py), driven directly."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.scheduler import BatchPolicy, ModelRejected, Scheduler

CHEAP = BatchPolicy(True, "on", max_rows=64, fixed_seconds=1e-6, per_element_seconds=1e-9)


def doubled(feeds):
    x = feeds["x"]
    if x.shape[1] != 2:
        raise ValueError("x must have 2 columns")
    return [x * 2]


@pytest.mark.parametrize(
    "policy, in_flight, runs_now",
    [
        (CHEAP, 1, True),  # alone, batching on, cheap: run at once
        (CHEAP, 2, False),  # another request could join: it goes through submit's loop turn
        (CHEAP, None, False),  # not served by the service's worker: unknown, so submit
        (BatchPolicy(True, "on", max_rows=64), 1, False),  # not timed at load: not known to be cheap
        (BatchPolicy(True, "on", delay=0.001, fixed_seconds=1e-6, per_element_seconds=1e-9), 1, False),
        (BatchPolicy(False, "off"), 1, False),  # unbatched models run in the pool
    ],
)
def test_a_request_alone_in_the_worker_runs_at_once_only_when_submit_would(policy, in_flight, runs_now):
    scheduler = Scheduler(doubled, ThreadPoolExecutor(1), policy, in_flight=lambda: in_flight)
    feeds = {"x": np.ones((3, 2), np.float32)}
    values = scheduler.run_now_if_alone(feeds)
    if runs_now:
        assert values[0].tolist() == [[2.0, 2.0]] * 3
        assert (scheduler.runs, scheduler.requests, scheduler.largest_rows, scheduler.busy) == (1, 1, 3, False)
    else:
        assert values is None and scheduler.runs == 0
        assert asyncio.run(scheduler.submit(feeds))[0].tolist() == [[2.0, 2.0]] * 3  # what it gets instead


def test_a_request_alone_that_the_model_rejects_raises_model_rejected_and_leaves_the_runner_idle():
    scheduler = Scheduler(doubled, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 1)
    with pytest.raises(ModelRejected, match="2 columns"):
        scheduler.run_now_if_alone({"x": np.ones((1, 3), np.float32)})
    assert not scheduler.busy and scheduler.runs == 1
    assert scheduler.run_now_if_alone({"x": np.ones((1, 2), np.float32)}) is not None


def test_a_request_that_finds_a_batch_running_waits_for_it():
    scheduler = Scheduler(doubled, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 1)
    scheduler.busy = True
    assert scheduler.run_now_if_alone({"x": np.ones((1, 2), np.float32)}) is None
