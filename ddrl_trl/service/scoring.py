"""The scoring side of the reward server: jobs, the queue, micro-batches across requests, reward calls in daemon
threads of their own with a time limit, and finished results kept for polling (`server` puts HTTP in front of it)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..rewards import compute_rewards, reward_name
from .wire import to_unit_floats

if TYPE_CHECKING:
    from .server import ServerLimits

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's samples (uint8 pixels) and, once scored, only its result (the samples are dropped)."""

    job_id: str
    samples: torch.Tensor | None
    prompts: list[str] | None
    columns: dict[str, list] | None
    status: str = "queued"
    scores: list[float | None] | None = None
    error: str | None = None
    finished_at: float | None = None

    def __post_init__(self):
        #: Samples in the request, and the bytes they hold until scored.
        self.size, self.nbytes = self.samples.shape[0], self.samples.element_size() * self.samples.nelement()

    def batch_key(self) -> tuple:
        """Jobs that can share one reward call: same sample shape and the same columns."""
        return tuple(self.samples.shape[1:]), tuple(sorted(self.columns))

    def finish(self, status: str, scores: list[float | None] | None = None, error: str | None = None) -> None:
        """Record the job's result, and drop what it held to be scored."""
        self.status, self.scores, self.error, self.finished_at = status, scores, error, time.monotonic()
        self.samples = self.prompts = self.columns = None  # a finished job holds its scores, nothing else


class _RewardTimeout(Exception):
    """A reward call ran past `batch_timeout_s` (it goes on in its thread; its jobs fail)."""


@dataclass
class _State:
    """What one server holds and counts: jobs, finished results in order, the queue, stuck reward calls, bytes."""

    jobs: dict[str, Job] = field(default_factory=dict)
    finished: OrderedDict = field(default_factory=OrderedDict)  # job ids in the order they finished
    queue: asyncio.Queue | None = None
    stuck: set = field(default_factory=set)  # reward calls still running past batch_timeout_s
    pending: int = 0
    held_bytes: int = 0
    uploading_bytes: int = 0  # reserved by bodies being received or parsed
    stored_scores: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "batches": 0, "samples": 0})


def _in_daemon_thread(call: Callable[[], object]) -> asyncio.Future:
    """Run `call` in a daemon thread of its own; a future of the running loop gets its result or exception.

    A daemon thread per call, not a pool: a call that never returns must not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def work() -> None:
        try:
            result, error = call(), None
        except BaseException as err:  # noqa: BLE001 — handed to the event loop, which fails the jobs
            result, error = None, err
        loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="ddrl-reward-call", daemon=True).start()
    return future


class Scorer:
    """The scoring side of one server: the queue of jobs, micro-batches of them, reward calls in threads of their
    own, and finished results kept for polling until they expire."""

    def __init__(self, reward_fn: Callable, limits: ServerLimits):
        self.reward_fn, self.limits, self.name = reward_fn, limits, reward_name(reward_fn)
        self.state = _State()

    def is_stuck(self) -> bool:
        """Whether `max_stuck_batches` reward calls are still running past their limit (new work is refused)."""
        return len(self.state.stuck) >= self.limits.max_stuck_batches

    def score_batch(self, pixels: torch.Tensor, prompts: list[str], columns: dict[str, list]) -> list[float | None]:
        """The reward on one concatenated batch (a worker thread); non-finite scores become None (invalid)."""
        scores = compute_rewards([self.reward_fn], to_unit_floats(pixels), prompts, columns)[:, 0].tolist()
        return [s if math.isfinite(s) else None for s in scores]

    async def call_reward(self, jobs: list[Job]) -> list[float | None]:
        """Run the reward on `jobs` in a daemon thread of its own; `_RewardTimeout` past `batch_timeout_s` (the call
        then goes on in its thread, counted as stuck until it returns, and its late result is dropped)."""
        pixels = torch.cat([job.samples for job in jobs])
        prompts = [p for job in jobs for p in job.prompts]
        columns = {key: [v for job in jobs for v in job.columns[key]] for key in jobs[0].columns}
        future = _in_daemon_thread(lambda: self.score_batch(pixels, prompts, columns))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.batch_timeout_s)
        except asyncio.TimeoutError:
            self.state.stuck.add(future)
            future.add_done_callback(self.state.stuck.discard)
            raise _RewardTimeout from None

    def finish(self, job: Job, status: str, scores=None, error=None) -> None:
        """Record a job's result, free its samples, and keep at most `max_stored_scores` scores of results."""
        state = self.state
        state.pending -= 1
        state.held_bytes -= job.nbytes
        job.finish(status, scores, error)
        state.finished[job.job_id] = None
        state.stored_scores += job.size
        while state.stored_scores > self.limits.max_stored_scores:
            self.forget_oldest_result()

    def fail(self, jobs: list[Job], error: str) -> None:
        """Finish every one of `jobs` with `error`."""
        for job in jobs:
            self.finish(job, "error", error=error)

    def forget_oldest_result(self) -> None:
        """Drop the result that finished first."""
        job = self.state.jobs.pop(self.state.finished.popitem(last=False)[0], None)
        self.state.stored_scores -= job.size if job is not None else 0

    async def run_batch(self, jobs: list[Job]) -> None:
        """Score `jobs` in one reward call and finish them: with their scores, or with the call's error."""
        timeout = self.limits.batch_timeout_s
        if self.is_stuck():  # calls that never return hold the reward: new ones would hang too
            n = len(self.state.stuck)
            self.fail(
                jobs,
                f"the reward is stuck ({n} calls have run past batch_timeout_s={timeout:g} s); restart the server",
            )
            return
        for job in jobs:
            job.status = "running"
        try:
            scores = await self.call_reward(jobs)
        except _RewardTimeout:
            logger.error(
                "reward %s did not finish a batch of %d requests within %.0f s", self.name, len(jobs), timeout
            )
            self.fail(jobs, f"the reward did not finish within batch_timeout_s={timeout:g} s")
            return
        except Exception as err:  # noqa: BLE001 — a failing reward fails its jobs, not the server
            await self._reward_failed(jobs, err)
            return
        self.state.counters["batches"] += 1
        self.state.counters["samples"] += sum(job.size for job in jobs)
        start = 0
        for job in jobs:
            self.finish(job, "done", scores=scores[start : start + job.size])
            start += job.size

    async def _reward_failed(self, jobs: list[Job], err: Exception) -> None:
        """A reward call on `jobs` raised `err`: a lone job fails with it; several are scored again one by one, so
        that only the guilty request fails."""
        if len(jobs) > 1:
            logger.warning(
                "reward %s failed on a batch of %d requests (%s); scoring them one by one", self.name, len(jobs), err
            )
            for job in jobs:
                await self.run_batch([job])
            return
        logger.exception("reward %s failed on a request of %d samples", self.name, jobs[0].size, exc_info=err)
        self.finish(jobs[0], "error", error=f"{type(err).__name__}: {err}")

    async def batcher(self) -> None:
        """Take the first queued job, gather more for up to `max_wait_ms` or `max_batch_samples`, and score them,
        one reward call per group of jobs that can share one."""
        # A get() that timed out is kept for the next round, never cancelled (cancelling a finished get drops a job).
        pending = None
        while True:
            batch, pending = await self._gather(pending)
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.batch_key(), []).append(job)
            for jobs in groups.values():
                await self.run_batch(jobs)

    async def _gather(self, pending: asyncio.Future | None) -> tuple[list[Job], asyncio.Future | None]:
        """The next micro-batch, starting with `pending` (a get() left from the last round) or the next queued job;
        and the get() still pending when the wait ran out (or None)."""
        loop, queue, limits = asyncio.get_running_loop(), self.state.queue, self.limits
        batch = [await (pending or queue.get())]
        pending = None
        size, deadline = batch[0].size, loop.time() + limits.max_wait_ms / 1000
        while size < limits.max_batch_samples and (remaining := deadline - loop.time()) > 0:
            pending = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({pending}, timeout=remaining)
            if not done:
                break
            batch.append(pending.result())
            pending = None
            size += batch[-1].size
        return batch, pending

    async def expire_results(self) -> None:
        """Drop finished results older than `result_ttl_s`, on a timer (not only when a request comes in)."""
        state, ttl = self.state, self.limits.result_ttl_s
        interval = min(max(ttl / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - ttl
            while state.finished:
                job = state.jobs.get(next(iter(state.finished)))
                if job is not None and job.finished_at >= cutoff:
                    break
                self.forget_oldest_result()

    @asynccontextmanager
    async def lifespan(self, _app):
        """The app's lifespan: the queue, the batcher and the expiry timer run while it serves."""
        self.state.queue = asyncio.Queue()
        tasks = [asyncio.create_task(self.batcher()), asyncio.create_task(self.expire_results())]
        yield
        for task in tasks:
            task.cancel()
