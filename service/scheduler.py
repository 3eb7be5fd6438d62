"""Adaptive batching in one worker: requests that arrive while the model is busy run together as one call.

No timer by default. A request that finds the runner idle arms a run for the next turn of the event loop, so that
requests parsed in the same turn join it; the last of the requests the worker has begun to join runs it at once
(a request alone in the worker runs straight away). Requests that arrive while a `session.run` is in flight
queue, and when it ends the runner takes everything queued (up to `MAX_BATCH_ROWS` rows, same shape but for the first
dimension) as one call, then splits the outputs back by row count. Under light load this adds no latency;
under heavy load the batches grow by themselves. `MAX_BATCH_DELAY_MS` opts into waiting for a fuller batch.

The scheduler sees tensors only, never JSON or HTTP (the protocol codecs), and runs the model through one
callable (the model store). Batching is used only for models where it is safe (`batch_safety`): every input and
output has a free first dimension and a self-test at load gives the same outputs for rows run alone and stacked.

Runs that are cheap (a small model, a few rows: estimated from timings taken at load) run on the event loop
itself: the hop to a thread costs more than they do. Everything else runs in the worker's thread pool, so the
loop keeps answering /health and reading other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import operator
import time
import types
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("service.scheduler")

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], list[Any]]

# A run estimated under this runs on the event loop (no thread hop); /health waits at most about this long.
INLINE_RUN_SECONDS = 0.0005


class ModelRejected(Exception):
    """The model raised on this request's own input (onnxruntime's checks); a 4xx for that request only."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class BatchPolicy:
    enabled: bool
    reason: str  # why batching is on or off, for /health and /metadata
    max_rows: int = 64
    delay: float = 0.0  # seconds to wait for more rows once the first request of a batch is in
    # Estimated seconds of one run: fixed + per_element * input elements (from timings at load); None: not
    # measured. Elements, not rows: a model with free image sizes costs more per row for larger images.
    fixed_seconds: float | None = None
    per_element_seconds: float | None = None

    def __post_init__(self) -> None:
        # Runs of fewer input elements than this are estimated (fixed + per_element * elements) under
        # INLINE_RUN_SECONDS: worked out once, not per request.
        if self.fixed_seconds is None or self.per_element_seconds is None or self.fixed_seconds >= INLINE_RUN_SECONDS:
            limit = 0.0
        elif self.per_element_seconds <= 0:
            limit = float("inf")
        else:
            limit = (INLINE_RUN_SECONDS - self.fixed_seconds) / self.per_element_seconds
        object.__setattr__(self, "inline_elements", limit)

    def as_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "reason": self.reason,
            "max_batch_rows": self.max_rows,
            "max_batch_delay_ms": round(self.delay * 1000, 3),
        }


class Pending:
    """One request queued for a batch (`Scheduler.enqueue`): its feeds, rows, input elements and batch key
    (`_measure`), the context to run it in and when it queued (for the opt-in delay); then its outcome, which
    `Scheduler.outputs` waits for.

    The outcome is (True, outputs), (False, the model's error on this request's input) or (None, an error of the
    batch's own). A batch that runs on the event loop sets it before the request's task runs again, so the request
    waits with a bare yield, not a future: a future and its done-callback cost more than the rest of the batching
    (docs/benchmarks.md). A `future` is made only for a batch that may run in the pool or after a delay, or, on
    demand, for a request still waiting after one turn."""

    __slots__ = ("feeds", "rows", "elements", "key", "context", "queued_at", "outcome", "future")

    def __init__(self, feeds: Feeds, rows: int, elements: int, key: tuple, context: contextvars.Context | None,
                 queued_at: float, future: asyncio.Future | None):
        self.feeds, self.rows, self.elements, self.key = feeds, rows, elements, key
        self.context, self.queued_at, self.future = context, queued_at, future
        self.outcome: tuple[bool | None, Any] | None = None


class Scheduler:
    """Runs each request's feeds through `runner`, batching concurrent requests when the policy allows.

    Lives on one event loop (the worker's); `submit` is its only entry point.
    """

    def __init__(self, runner: Runner, executor: Executor, policy: BatchPolicy, observer: Any = None,
                 in_flight: Callable[[], int | None] | None = None):
        self.runner, self.executor, self.policy = runner, executor, policy
        self.observer = observer  # metrics: .batch(rows, requests, seconds); optional (it reads `depth` itself)
        # The worker's requests begun and not answered (service/worker.py), None if unknown; optional.
        self.in_flight = in_flight
        self.queue: deque[Pending] = deque()
        # Whether a request of another batch key than the oldest's has queued since the queue was last empty:
        # until one has, the next batch is everything queued (when it fits in max_rows), with no search.
        self.mixed = False
        self.busy = False  # a batch is running (or scheduled to run) now
        self._timer: asyncio.Handle | None = None  # the armed dispatch, until it runs
        # What this worker's scheduler has done, for /health: runs, requests, the largest batch.
        self.runs = self.requests = self.largest_rows = self.largest_requests = 0

    @property
    def depth(self) -> int:
        return len(self.queue)

    def as_json(self) -> dict[str, Any]:
        """The policy and what this worker did with it: /health's and /metadata's "batching"."""
        return {
            **self.policy.as_json(),
            "worker": {
                "runs": self.runs,
                "requests": self.requests,
                "largest_batch_rows": self.largest_rows,
                "largest_batch_requests": self.largest_requests,
                "queued": len(self.queue),
            },
        }

    def would_batch(self, feeds: Feeds) -> bool:
        """Whether these feeds could share a run with others: batching on and fewer rows than a full batch."""
        rows = _measure(feeds)[0] if self.policy.enabled else None
        return rows is not None and rows < self.policy.max_rows

    def run_now(self, feeds: Feeds) -> tuple[list[Any], float]:
        """Run one request alone in the calling thread (the pool), for requests that fill a batch by themselves:
        (outputs, seconds). The caller reports it with `record` once back on the event loop."""
        started = time.perf_counter()
        try:
            outputs = self.runner(feeds)
        except Exception as exc:
            raise ModelRejected(exc) from None
        return outputs, time.perf_counter() - started

    def record(self, feeds: Feeds, seconds: float) -> None:
        """Count a run of one request made outside a batch (`run_now`, `_run_alone`), on the event loop."""
        self._count(_measure(feeds)[0] or 1, 1, seconds)

    def run_now_if_alone(self, feeds: Feeds) -> list[Any] | None:
        """What `enqueue` would do for a request alone in the worker (the server says so), without the queue: run
        it on the loop at once, when batching is on without a delay, nothing runs or waits, and the run is cheap.
        No future, no batch bookkeeping. None: the request goes through `enqueue` (or `submit`)."""
        policy = self.policy
        if self.busy or not policy.enabled or policy.delay or self.queue or self.in_flight is None:
            return None
        others = self.in_flight()
        if others is None or others > 1:
            return None
        rows, elements, _ = _measure(feeds)
        if not rows or not self._cheap(elements):
            return None
        started = time.perf_counter()
        try:
            return self.runner(feeds)
        except Exception as exc:
            raise ModelRejected(exc) from None
        finally:
            self._count(rows, 1, time.perf_counter() - started)

    async def submit(self, feeds: Feeds) -> list[Any]:
        """The model's outputs for `feeds`, run alone or as part of a batch; raises ModelRejected."""
        pending = self.enqueue(feeds)
        if pending is None:  # not batchable: run it alone, several at once in the pool as before
            return await self._run_alone(asyncio.get_running_loop(), feeds)
        return await self.outputs(pending)

    async def outputs(self, pending: Pending) -> list[Any]:
        """The outputs of a request `enqueue` queued, once its batch has run; raises ModelRejected for the model's
        refusal of its input, or the batch's own error as it is."""
        outcome = pending.outcome
        if outcome is None:
            if pending.future is None:  # its batch runs on the loop: in this turn, or first thing in the next
                await _next_turn()
                outcome = pending.outcome
            if outcome is None:  # still queued (behind another batch, or one in the pool): wait on a future
                if pending.future is None:
                    pending.future = asyncio.get_running_loop().create_future()
                outcome = await pending.future
        ok, value = outcome
        if ok:
            return value
        raise ModelRejected(value) if ok is False else value

    def enqueue(self, feeds: Feeds) -> Pending | None:
        """`submit` for a request that can share a batch, without a coroutine of its own: the request, queued,
        whose outputs `outputs` gives (its outcome is set already when it ran at once). None for a request that
        cannot be batched: `submit` runs it.

        It joins the queue; the first to find the runner idle arms the next batch for the next loop turn, so that
        requests parsed in this turn join it. The last to arrive of the requests the worker has begun runs the
        batch at once instead: no one else can join it.
        """
        policy = self.policy
        if not policy.enabled:
            return None
        rows, elements, key = _measure(feeds)
        if rows is None:
            return None
        loop = asyncio.get_running_loop()
        queued_at = time.perf_counter() if policy.delay else 0.0  # what the opt-in delay counts from
        # A future from the start only where the batch may run in the pool or wait for the delay.
        future = loop.create_future() if policy.delay or not self._cheap(elements) else None
        pending = Pending(feeds, rows, elements, key, contextvars.copy_context(), queued_at, future)
        queue = self.queue
        if queue and key != queue[0].key:
            self.mixed = True
        queue.append(pending)
        if not self.busy:
            self._arm(loop)
        if self._timer is not None and not policy.delay and self.in_flight is not None:
            begun = self.in_flight()  # the requests the worker has begun and not answered
            if begun is not None and len(queue) >= begun:
                # Every request the worker has begun is queued: no one else can join this batch before the armed
                # turn, so the last to arrive runs it now (on the loop if cheap: then its own answer is ready, no
                # suspension) instead of every request waiting a loop turn for it.
                self._timer.cancel()
                self._dispatch(loop)
        return pending

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        """The running batch is done: start the next one if anything queued meanwhile."""
        if self.queue:
            self._arm(loop)
        else:
            self.busy = False

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the next batch: on the next loop turn, or after the opt-in delay unless the batch is full."""
        self.busy = True
        delay = self.policy.delay
        if delay > 0 and sum(p.rows for p in self.queue) < self.policy.max_rows:
            oldest = self.queue[0].queued_at
            wait = max(0.0, oldest + delay - time.perf_counter())
            self._timer = loop.call_later(wait, self._dispatch, loop)
        else:
            self._timer = loop.call_soon(self._dispatch, loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        batch, rows, elements = self._take()
        if not batch:
            self.busy = False
            return
        started = time.perf_counter()
        results = None
        try:
            if self._cheap(elements):
                results = self._run_batch(batch, rows)
            else:
                future = loop.run_in_executor(self.executor, self._run_batch, batch, rows)
                future.add_done_callback(lambda f: self._finish(loop, batch, rows, _results(f, len(batch)), started))
        except Exception as exc:  # the batch itself failed, not one request's input: fail them all, go on
            results = [(None, exc)] * len(batch)
        if results is not None:
            self._finish(loop, batch, rows, results, started)

    def _cheap(self, elements: int) -> bool:
        """Whether a run of this many input elements is estimated cheaper than a hop to the pool, so it runs on
        the event loop."""
        return elements < self.policy.inline_elements  # type: ignore[attr-defined]

    def _take(self) -> tuple[list[Pending], int, int]:
        """Queued requests for the next batch: the oldest queued and every queued request of the same shape after
        it, up to max_rows rows in all. Returns (those taken from the queue, their rows, their input elements)."""
        queue = self.queue
        if not queue:
            return [], 0, 0
        if not self.mixed:  # every request queued has one key: all of them, if they fit
            rows = sum(map(_ROWS, queue))
            if rows <= self.policy.max_rows:
                taken = list(queue)
                queue.clear()
                return taken, rows, sum(map(_ELEMENTS, taken))
        first = queue.popleft()
        taken = [first]
        rows, elements = first.rows, first.elements
        if queue and rows < self.policy.max_rows:
            kept: deque[Pending] = deque()
            while queue:
                pending = queue.popleft()
                if pending.key == first.key and rows + pending.rows <= self.policy.max_rows:
                    taken.append(pending)
                    rows += pending.rows
                    elements += pending.elements
                else:
                    kept.append(pending)
            self.queue = queue = kept
        self.mixed = bool(queue) and any(p.key != queue[0].key for p in queue)
        return taken, rows, elements

    def _run_batch(self, batch: list[Pending], rows: int) -> list[tuple[bool, Any]]:
        """(ok, outputs or error) for each request of the batch; one request's bad input never fails another."""
        if len(batch) == 1:
            return [self._run_one(batch[0])]
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        try:
            outputs = self.runner(feeds)
        except Exception:  # someone's input made the model fail: find whose, by running each alone
            return [self._run_one(p) for p in batch]
        results, start = [], 0
        for pending in batch:
            end = start + pending.rows
            results.append((True, [value[start:end] for value in outputs]))
            start = end
        return results

    def _run_one(self, pending: Pending) -> tuple[bool, Any]:
        try:
            if pending.context is None:
                return True, self.runner(pending.feeds)
            return True, pending.context.run(self.runner, pending.feeds)
        except Exception as exc:
            return False, exc

    def _finish(self, loop, batch: list[Pending], rows: int, results: list[tuple[bool | None, Any]],
                started: float) -> None:
        """Hand each request of the batch its outputs, or its error: (True, outputs), (False, the model's error
        on its input: ModelRejected) or (None, an error of the batch's own, raised as it is: a 500), then start
        the next batch. Whatever happened, every request has its outcome and the runner goes on."""
        self._count(rows, len(batch), time.perf_counter() - started)
        for pending, outcome in zip(batch, results):
            pending.outcome = outcome  # `outputs` reads it, when its request's task runs again or from the future
            future = pending.future
            if future is not None and not future.done():  # (done: a client that went away)
                future.set_result(outcome)
        self._release(loop)

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, feeds: Feeds) -> list[Any]:
        started = time.perf_counter()
        context = contextvars.copy_context()
        try:
            outputs = await loop.run_in_executor(self.executor, context.run, self.runner, feeds)
        except Exception as exc:
            raise ModelRejected(exc) from None
        self.record(feeds, time.perf_counter() - started)
        return outputs

    def _count(self, rows: int, requests: int, seconds: float) -> None:
        """One run done: this worker's stats for /health, and the metrics."""
        self.runs += 1
        self.requests += requests
        self.largest_rows = max(self.largest_rows, rows)
        self.largest_requests = max(self.largest_requests, requests)
        if self.observer is not None:
            self.observer.batch(rows, requests, seconds)


_ROWS, _ELEMENTS = operator.attrgetter("rows"), operator.attrgetter("elements")


@types.coroutine
def _next_turn() -> Any:
    """Let the event loop run one turn, then go on (a bare yield: the task is scheduled again at once)."""
    yield


def _results(future: asyncio.Future, count: int) -> list[tuple[bool | None, Any]]:
    if future.cancelled():  # the pool shut down under it (worker exit)
        return [(False, RuntimeError("the worker is shutting down"))] * count
    error = future.exception()
    if error is not None:  # the batch itself failed in the pool (see `_finish`)
        return [(None, error)] * count
    return future.result()


def _measure(feeds: Feeds) -> tuple[int | None, int, tuple]:
    """(rows, input elements, batch key) of a request, in one pass. Rows: the first dimension all its inputs share,
    None if they don't (or one is rank 0). Elements: what a run's cost is estimated from. Requests batch together
    only when their keys are equal: every input agrees on dtype (by kind, size and byte order) and on every
    dimension but the first."""
    if len(feeds) == 1:  # the usual model: one input
        ((name, value),) = feeds.items()
        shape = value.shape
        if not shape or not shape[0]:
            return None, 0, ()
        return shape[0], value.size, ((name, value.dtype, shape[1:]),)
    rows, elements, key = None, 0, []
    for name, value in feeds.items():
        shape = value.shape
        if not shape or (rows is not None and shape[0] != rows):
            return None, 0, ()
        rows = shape[0]
        elements += value.size
        key.append((name, value.dtype, shape[1:]))
    return (rows if rows else None), elements, tuple(key)


# --- whether batching is safe for a model ------------------------------------------------------------------------


def batch_safety(
    runner: Runner,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    setting: str,
    max_rows: int,
    delay: float,
    example: Feeds | None = None,
) -> BatchPolicy:
    """The batching policy for a model: BATCHING=off, or on/auto after the structural check and a self-test.

    `inputs`/`outputs` are the model's TensorSpecs (service/tensors.py); `example` a known-good feed (the warm-up input) whose
    per-row shapes the self-test uses instead of guessing free dimensions. The self-test runs a few random rows
    alone and stacked and compares the outputs; it also times runs to decide what may run inline.
    """

    def policy(enabled: bool, reason: str, timing: tuple[float, float] | None = None) -> BatchPolicy:
        fixed, per_element = timing or (None, None)
        return BatchPolicy(enabled, reason, max_rows, delay, fixed, per_element)

    if setting == "off":
        return policy(False, "off (BATCHING=off)")
    problem = _structural_problem(inputs, outputs)
    if problem:
        return policy(False, f"off: {problem}")
    try:
        rows = [_row(inputs, example, seed) for seed in range(2)]
        alone, took = [], []
        for row in rows:
            started = time.perf_counter()
            alone.append(runner(row))
            took.append(time.perf_counter() - started)
        stacked = runner({name: np.concatenate([row[name] for row in rows]) for name in rows[0]})
    except Exception as exc:
        return policy(False, f"off: the batching self-test could not run the model ({type(exc).__name__}: {exc})")
    mismatch = _mismatch(alone, stacked, outputs)
    if mismatch:
        if setting == "on":
            log.warning("BATCHING=on although the self-test failed: %s", mismatch)
            return policy(True, f"on (BATCHING=on; the self-test failed: {mismatch})",
                          _timing(runner, inputs, example, min(took)))  # fmt: skip
        return policy(False, f"off: {mismatch}")
    return policy(True, "on: every input and output has a free first dimension and rows run alone or stacked agree",
                  _timing(runner, inputs, example, min(took)))  # fmt: skip


def _structural_problem(inputs: Sequence[Any], outputs: Sequence[Any]) -> str | None:
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if spec.dtype is None:
                return f"{kind} {spec.name!r} is a {spec.ort_type}, not a tensor"
            if not spec.shape:
                return f"{kind} {spec.name!r} is a scalar (rank 0), so it has no batch dimension"
            if isinstance(spec.shape[0], int):
                return f"{kind} {spec.name!r} has a fixed first dimension ({spec.shape[0]})"
    return None


def _row(inputs: Sequence[Any], example: Feeds | None, seed: int) -> Feeds:
    """One random row for every input, shaped like the example's rows (or fixed dims, free ones as 1)."""
    rng = np.random.default_rng(seed)
    row = {}
    for spec in inputs:
        if example is not None and spec.name in example and example[spec.name].ndim:
            shape = (1, *example[spec.name].shape[1:])
        else:
            shape = (1, *(d if isinstance(d, int) else 1 for d in spec.shape[1:]))
        row[spec.name] = _random(rng, spec, shape)
    return row


def _random(rng: np.random.Generator, spec: Any, shape: tuple[int, ...]) -> np.ndarray:
    dtype = spec.dtype
    if dtype.kind == "O":  # tensor(string)
        return rng.choice(np.array(["a", "b", "c"], dtype=object), size=shape)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 2, size=shape).astype(dtype)  # small values: valid for indices and counts alike
    return rng.standard_normal(size=shape).astype(dtype)


def _mismatch(alone: list[list[Any]], stacked: list[Any], outputs: Sequence[Any]) -> str | None:
    start = 0
    for run in alone:
        for spec, single, batched in zip(outputs, run, stacked):
            single, batched = np.asarray(single), np.asarray(batched)
            if not batched.ndim or batched.shape[0] != len(alone) * single.shape[0]:
                return f"output {spec.name!r} does not have one row per input row (shape {list(batched.shape)})"
            part = batched[start : start + single.shape[0]]
            if single.dtype.kind in "fc":
                same = np.allclose(part, single, rtol=1e-4, atol=1e-5, equal_nan=True)
            else:
                same = np.array_equal(part, single)
            if not same:
                return f"output {spec.name!r} changes when rows are run together (it mixes rows, e.g. a batch statistic)"
        start += np.asarray(run[0]).shape[0]
    return None


def _timing(runner: Runner, inputs: Sequence[Any], example: Feeds | None, one_row: float) -> tuple[float, float] | None:
    """(fixed, per input element) seconds of a run, from the best of a few runs of 1 and of 16 rows.

    Only models whose one-row run is under the inline limit are timed with 16 rows: for any other, no run is
    cheap enough to stay on the event loop, and 16 rows of a large model would cost start-up time and memory
    (its arena keeps what the largest run took). `one_row`: the self-test's fastest one-row run; when that is over
    the limit already, no more runs are spent on start-up (a large model's run can take a second)."""
    if one_row >= INLINE_RUN_SECONDS:
        return one_row, 0.0
    try:
        one = _row(inputs, example, 0)

        def best(feeds: Feeds) -> float:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                runner(feeds)
                times.append(time.perf_counter() - started)
            return min(times)

        t1 = best(one)
        if t1 >= INLINE_RUN_SECONDS:
            return t1, 0.0
        t16 = best({name: np.repeat(value, 16, axis=0) if value.ndim else value for name, value in one.items()})
    except Exception:
        return None
    elements = sum(value.size for value in one.values())
    per_element = max(0.0, (t16 - t1) / (15 * elements))
    return max(0.0, t1 - per_element * elements), per_element
