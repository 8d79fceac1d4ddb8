"""The reward server: submit a batch → job id → poll for scores, with micro-batching across requests.

    ddrl-trl serve-reward --reward <builtin | module:function | hub id/path> --host 127.0.0.1 --port 8000 \\
        --token-file token.txt

Endpoints (JSON):
- `GET /health` → `{"status": "ok", "reward": name, "queued": n, "requests": n, "batches": n, "samples": n}`;
  no token needed, reveals nothing but the reward's name and counters.
- `POST /v1/score` (bearer token) with a `wire.ScoreRequest` → 202 `{"id": job_id, "status": "queued"}`.
- `GET /v1/score/{job_id}` (bearer token) → `{"id", "status": "queued" | "running" | "done" | "error",
  "scores": [float | null] | null, "error": str | null}`; finished jobs are kept `result_ttl_s` seconds.

Errors never take the server down: a missing or wrong token → 401; a body over `max_request_bytes` → 413; a body
that is not JSON → 400; a request of the wrong form → 422 with a message; a reward that raises fails its jobs with
the error text. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..rewards import compute_rewards, reward_name
from .wire import PayloadError, ScoreRequest, check_lengths, decode_samples

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's samples and, once scored, its result."""

    samples: torch.Tensor
    prompts: list[str]
    columns: dict[str, list]
    status: str = "queued"
    scores: list[float | None] | None = None
    error: str | None = None
    finished_at: float | None = None

    def batch_key(self) -> tuple:
        """Jobs that can share one reward call: same sample shape and the same columns."""
        return tuple(self.samples.shape[1:]), tuple(sorted(self.columns))


@dataclass
class ServerLimits:
    """Bounds of one server. Defaults suit a GPU reward model scoring 512-px images."""

    max_request_bytes: int = 64 * 2**20  # ~ 80 images of 512x512 after base64
    max_samples_per_request: int = 1024
    max_batch_samples: int = 64  # micro-batch size across requests
    max_wait_ms: float = 10.0  # how long the first queued job waits for company
    result_ttl_s: float = 600.0


@dataclass
class _State:
    jobs: dict[str, Job] = field(default_factory=dict)
    queue: asyncio.Queue | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "batches": 0, "samples": 0})


def create_app(reward_fn: Callable, token: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `reward_fn` behind bearer `token` (uvicorn runs it; tests too)."""
    if not token:
        raise ValueError("The reward server needs a non-empty token.")
    limits = limits or ServerLimits()
    name = reward_name(reward_fn)
    state = _State()
    expected = f"Bearer {token}".encode()

    def score_batch(jobs: list[Job]) -> None:
        """Run the reward once on the concatenated jobs (a worker thread) and hand each job its scores."""
        samples = torch.cat([job.samples for job in jobs])
        prompts = [p for job in jobs for p in job.prompts]
        columns = {key: [v for job in jobs for v in job.columns[key]] for key in jobs[0].columns}
        scores = compute_rewards([reward_fn], samples, prompts, columns)[:, 0].tolist()
        start = 0
        for job in jobs:
            part = scores[start : start + len(job.prompts)]
            job.scores = [None if math.isnan(s) else s for s in part]
            start += len(job.prompts)

    async def run_batch(jobs: list[Job]) -> None:
        for job in jobs:
            job.status = "running"
        try:
            await asyncio.to_thread(score_batch, jobs)
            status, error = "done", None
        except Exception as err:  # noqa: BLE001 — a failing reward fails its jobs, not the server
            logger.exception("reward %s failed on a batch of %d requests", name, len(jobs))
            status, error = "error", f"{type(err).__name__}: {err}"
        now = time.monotonic()
        for job in jobs:
            job.status, job.error, job.finished_at = status, error, now
        state.counters["batches"] += 1
        state.counters["samples"] += sum(len(job.prompts) for job in jobs)

    async def batcher() -> None:
        """Take the first queued job, gather more for up to `max_wait_ms` or `max_batch_samples`, score them."""
        loop = asyncio.get_running_loop()
        # A get() that timed out is kept for the next round, never cancelled: cancelling a finished get would drop a job.
        pending = None
        while True:
            batch = [await (pending or state.queue.get())]
            pending = None
            size, deadline = len(batch[0].prompts), loop.time() + limits.max_wait_ms / 1000
            while size < limits.max_batch_samples and (remaining := deadline - loop.time()) > 0:
                pending = asyncio.ensure_future(state.queue.get())
                done, _ = await asyncio.wait({pending}, timeout=remaining)
                if not done:
                    break
                batch.append(pending.result())
                pending = None
                size += len(batch[-1].prompts)
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.batch_key(), []).append(job)
            for jobs in groups.values():
                await run_batch(jobs)

    @asynccontextmanager
    async def lifespan(_app):
        state.queue = asyncio.Queue()
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(title=f"ddrl-trl reward service: {name}", lifespan=lifespan)

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_request_bytes):
            raise HTTPException(413, f"request body over the limit of {limits.max_request_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise HTTPException(413, f"request body over the limit of {limits.max_request_bytes} bytes")
        return bytes(body)

    def purge_expired() -> None:
        cutoff = time.monotonic() - limits.result_ttl_s
        for job_id in [k for k, j in state.jobs.items() if j.finished_at is not None and j.finished_at < cutoff]:
            del state.jobs[job_id]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "reward": name, "queued": state.queue.qsize(), **state.counters}

    @app.post("/v1/score", status_code=202)
    async def submit(request: Request) -> dict:
        authorize(request)
        body = await read_body(request)
        try:
            payload = ScoreRequest.model_validate_json(body)
        except ValidationError as err:
            if any(e["type"] == "json_invalid" for e in err.errors()):
                raise HTTPException(400, "request body is not valid JSON") from None
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
            raise HTTPException(422, f"malformed score request: {problems}") from None
        try:
            samples = decode_samples(payload.images)
            check_lengths(payload, samples.shape[0])
        except PayloadError as err:
            raise HTTPException(422, f"malformed score request: {err}") from None
        if samples.shape[0] > limits.max_samples_per_request:
            raise HTTPException(413, f"{samples.shape[0]} samples over the limit of {limits.max_samples_per_request}")
        purge_expired()
        job_id = uuid.uuid4().hex
        state.jobs[job_id] = Job(samples, payload.prompts, payload.columns)
        state.counters["requests"] += 1
        await state.queue.put(state.jobs[job_id])
        return {"id": job_id, "status": "queued"}

    @app.get("/v1/score/{job_id}")
    async def result(job_id: str, request: Request) -> JSONResponse:
        authorize(request)
        job = state.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or finished more than {limits.result_ttl_s:.0f} s ago)")
        return JSONResponse({"id": job_id, "status": job.status, "scores": job.scores, "error": job.error})

    return app


def read_token_file(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace stripped); a clear error if missing or empty."""
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except OSError as err:
        raise ValueError(f"Cannot read the token file {path!r} ({err.strerror}). Write a secret into it, e.g. "
                         f"`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > {path}`.") from err
    if not token:
        raise ValueError(f"The token file {path!r} is empty: write a secret into it.")
    return token


def serve(reward: str, host: str, port: int, token_file: str, limits: ServerLimits | None = None) -> None:
    """Load `reward` (any `reward_funcs` string) and serve it with uvicorn until interrupted."""
    import uvicorn

    from ..rewards import resolve_reward

    token = read_token_file(token_file)  # before loading a model: bad input fails fast
    reward_fn = resolve_reward(reward)
    logger.info("serving reward %s on http://%s:%d (token from %s)", reward_name(reward_fn), host, port, token_file)
    uvicorn.run(create_app(reward_fn, token, limits), host=host, port=port, log_level="info")
