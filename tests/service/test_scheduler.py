"""The batching scheduler's path for a request alone in the worker (service/scheduler.py), driven directly."""

import asyncio
import threading
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


def test_the_last_of_the_requests_in_flight_runs_the_batch_at_once_and_answers_every_one():
    """Three requests begun in the worker: the first two queue and wait; the third finds all three queued, runs
    them as one batch on the spot (a cheap run), and its own answer is ready without a loop turn."""

    async def scenario():
        runs = []

        def runner(feeds):
            runs.append(feeds["x"].shape[0])
            return doubled(feeds)

        scheduler = Scheduler(runner, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 3)
        queued = [scheduler.enqueue({"x": np.full((1, 2), i, np.float32)}) for i in range(3)]
        assert runs == [3] and all(p.outcome for p in queued)  # before any await: no loop turn was needed
        assert not any(p.future for p in queued)  # a batch on the loop: no future made for anyone
        answers = [(await scheduler.outputs(p))[0].tolist() for p in queued]
        assert answers == [[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 4.0]]]  # each its own rows back
        assert (scheduler.runs, scheduler.largest_requests, scheduler.busy, scheduler.depth) == (1, 3, False, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize("in_flight", [5, None])  # more begun than ever arrive (a /health call, say), or unknown
def test_when_not_every_request_in_flight_arrives_the_armed_turn_runs_the_batch(in_flight):
    async def scenario():
        scheduler = Scheduler(doubled, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: in_flight)
        queued = [scheduler.enqueue({"x": np.full((1, 2), i, np.float32)}) for i in range(2)]
        assert not any(p.outcome for p in queued) and scheduler.busy  # waiting for others who may join
        answers = await asyncio.wait_for(asyncio.gather(*map(scheduler.outputs, queued)), 5)
        assert [a[0].tolist() for a in answers] == [[[0.0, 0.0]], [[2.0, 2.0]]]
        assert (scheduler.runs, scheduler.largest_requests, scheduler.busy) == (1, 2, False)

    asyncio.run(scenario())


def test_the_last_to_arrive_with_a_different_shape_waits_for_the_next_batch():
    async def scenario():
        scheduler = Scheduler(doubled, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 2)
        first = scheduler.enqueue({"x": np.ones((1, 2), np.float32)})
        other = scheduler.enqueue({"x": np.ones((1, 2), np.float64)})  # another dtype: never in first's batch
        assert first.outcome and not other.outcome  # the batch ran without it; it runs on the next turn
        assert (await asyncio.wait_for(scheduler.outputs(other), 5))[0].dtype == np.float64
        assert (scheduler.runs, scheduler.busy) == (2, False)

    asyncio.run(scenario())


@pytest.mark.parametrize("cheap", [True, False], ids=["on the loop", "in the pool"])
def test_a_batch_that_fails_on_its_own_fails_each_request_and_the_runner_goes_on(cheap):
    """A runner whose outputs have no row per request cannot be split: an error of the batch, not of anyone's
    input. Every request of it gets the error (a 500, not the model's 4xx), none waits forever, and the next
    requests are served."""

    def scalar_output(feeds):
        return [np.float32(feeds["x"].sum())]  # rank 0: nothing to split by rows

    policy = CHEAP if cheap else BatchPolicy(True, "on", max_rows=64)

    async def scenario():
        scheduler = Scheduler(scalar_output, ThreadPoolExecutor(1), policy, in_flight=lambda: 2)
        queued = [scheduler.enqueue({"x": np.ones((1, 2), np.float32)}) for _ in range(2)]
        outcomes = await asyncio.wait_for(asyncio.gather(*map(scheduler.outputs, queued), return_exceptions=True), 5)
        assert all(isinstance(o, Exception) and not isinstance(o, ModelRejected) for o in outcomes)
        assert not scheduler.busy and scheduler.depth == 0
        scheduler.runner = doubled  # the next requests find the runner free
        again = [scheduler.enqueue({"x": np.ones((1, 2), np.float32)}) for _ in range(2)]
        assert [(await asyncio.wait_for(scheduler.outputs(p), 5))[0].tolist() for p in again] == [[[2.0, 2.0]]] * 2

    asyncio.run(scenario())


def test_requests_of_another_shape_queued_between_leave_the_batch_to_the_oldest_shape_and_run_next():
    """Three requests queued: float32, float64, float32. The batch is the oldest's shape (the two float32 ones);
    the float64 one runs in the batch after it. Every request gets its own rows back."""

    async def scenario():
        runs = []

        def runner(feeds):
            runs.append((feeds["x"].dtype.name, feeds["x"].shape[0]))
            return doubled(feeds)

        scheduler = Scheduler(runner, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 3)
        queued = [scheduler.enqueue({"x": np.full((1, 2), i, dtype)})
                  for i, dtype in enumerate([np.float32, np.float64, np.float32])]  # fmt: skip
        answers = await asyncio.wait_for(asyncio.gather(*map(scheduler.outputs, queued)), 5)
        assert runs == [("float32", 2), ("float64", 1)]
        assert [a[0].tolist() for a in answers] == [[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 4.0]]]
        assert [a[0].dtype for a in answers] == [np.float32, np.float64, np.float32]
        assert (scheduler.busy, scheduler.depth, scheduler.mixed) == (False, 0, False)

    asyncio.run(scenario())


def test_a_batch_holds_at_most_max_rows_and_the_rest_runs_next():
    async def scenario():
        runs = []

        def runner(feeds):
            runs.append(feeds["x"].shape[0])
            return doubled(feeds)

        policy = BatchPolicy(True, "on", max_rows=4, fixed_seconds=1e-6, per_element_seconds=1e-9)
        scheduler = Scheduler(runner, ThreadPoolExecutor(1), policy, in_flight=lambda: 3)
        queued = [scheduler.enqueue({"x": np.full((rows, 2), rows, np.float32)}) for rows in (2, 1, 3)]
        answers = await asyncio.wait_for(asyncio.gather(*map(scheduler.outputs, queued)), 5)
        assert runs == [3, 3]  # 2 + 1 rows, then the 3 that would have made 6
        assert [a[0].tolist() for a in answers] == [[[4.0, 4.0]] * 2, [[2.0, 2.0]], [[6.0, 6.0]] * 3]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "outputs",
    [
        lambda x: [x * 2, (x * 3)[:, :1]],  # two outputs, a row each per request
        lambda x: [list(x * 2)],  # a list, not an array (BATCHING=on forced): sliced as a list
        lambda x: [(x * 2)[:1]],  # fewer rows than the batch (BATCHING=on forced): sliced, no one waits forever
    ],
    ids=["arrays", "a list", "fewer rows"],
)
def test_outputs_are_split_back_by_request_whatever_their_form(outputs):
    async def scenario():
        scheduler = Scheduler(lambda feeds: outputs(feeds["x"]), ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 3)
        feeds = [np.full((1, 2), i, np.float32) for i in range(3)]
        queued = [scheduler.enqueue({"x": x}) for x in feeds]
        answers = await asyncio.wait_for(asyncio.gather(*map(scheduler.outputs, queued)), 5)
        whole = outputs(np.concatenate(feeds))
        for i, answer in enumerate(answers):  # request i gets rows i:i+1 of every output, in its form
            assert len(answer) == len(whole)
            for got, expected in zip(answer, whole):
                assert np.asarray(got).tolist() == np.asarray(expected[i : i + 1]).tolist()
        assert not scheduler.busy

    asyncio.run(scenario())


def test_requests_whose_batch_goes_to_the_pool_wait_on_a_future_made_when_needed():
    """Each request alone is cheap enough for the loop, the three together are not: the batch runs in the pool,
    and the requests, which queued without a future, still get their own rows once it is done."""
    policy = BatchPolicy(True, "on", max_rows=64, fixed_seconds=1e-6, per_element_seconds=1e-4)  # < 5 elements

    release = threading.Event()

    def held(feeds):
        release.wait(5)
        return doubled(feeds)

    async def scenario():
        scheduler = Scheduler(held, ThreadPoolExecutor(1), policy, in_flight=lambda: 3)
        queued = [scheduler.enqueue({"x": np.full((1, 2), i, np.float32)}) for i in range(3)]
        assert not any(p.outcome or p.future for p in queued) and scheduler.busy  # running in the pool
        waiting = asyncio.gather(*map(scheduler.outputs, queued))
        for _ in range(3):  # the requests' turns: each finds no outcome yet and makes a future to wait on
            await asyncio.sleep(0)
        assert all(p.future is not None and not p.future.done() for p in queued)
        release.set()
        answers = await asyncio.wait_for(waiting, 5)
        assert [a[0].tolist() for a in answers] == [[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 4.0]]]
        assert not scheduler.busy

    asyncio.run(scenario())


def test_a_request_whose_client_went_away_while_queued_leaves_the_others_answered():
    async def scenario():
        scheduler = Scheduler(doubled, ThreadPoolExecutor(1), CHEAP, in_flight=lambda: 3)
        queued = [scheduler.enqueue({"x": np.full((1, 2), i, np.float32)}) for i in range(2)]  # the third never comes
        waiting = [asyncio.ensure_future(scheduler.outputs(p)) for p in queued]
        waiting[0].cancel()
        assert (await asyncio.wait_for(waiting[1], 5))[0].tolist() == [[2.0, 2.0]]
        assert waiting[0].cancelled() and not scheduler.busy and scheduler.depth == 0
        later = scheduler.enqueue({"x": np.ones((1, 2), np.float32)})
        assert (await asyncio.wait_for(scheduler.outputs(later), 5))[0].tolist() == [[2.0, 2.0]]

    asyncio.run(scenario())
