"""The reward server: submit a batch → job id → poll for scores, with micro-batching across requests.

    ddrl-trl serve-reward --reward <builtin | module:function | hub id/path> --host 127.0.0.1 --port 8000 \\
        --token-file token.txt

Endpoints (JSON):
- `GET /health` → `{"status": "ok" | "degraded" | "stuck", "reward": name, "queued", "pending_jobs",
  "stored_results", "stored_scores", "held_bytes", "uploading_bytes", "stuck_batches", "requests", "batches",
  "samples"}` (503 while stuck); no token needed, reveals nothing but the reward's name and counters.
- `POST /v1/score` (bearer token) with a `wire.ScoreRequest` → 202 `{"id": job_id, "status": "queued"}`.
- `GET /v1/score/{job_id}` (bearer token) → `{"id", "status": "queued" | "running" | "done" | "error",
  "scores": [float | null] | null, "error": str | null}`; finished jobs are kept `result_ttl_s` seconds.
No other route is served (no `/docs`, no `/openapi.json`).

Bounds, so that no client can exhaust the server (`ServerLimits`):
- memory: a body over `max_request_bytes` → 413 before it is read in full; bodies being received (and parsed) at
  once hold at most `max_inflight_upload_bytes`, reserved from their declared length before any is read (503 with
  Retry-After while others fill it, 413 for a body over it alone); one holding more than `max_json_values`
  JSON values → 413 before it is parsed (parsed JSON costs ~50× its bytes); samples wait as uint8 pixels; more than
  `max_pending_jobs` unscored jobs, or `max_pending_bytes` of their pixels → 503 with Retry-After; a scored job keeps
  its scores only (its pixels are freed at once), expires after `result_ttl_s` on a timer, and at most
  `max_stored_scores` scores are kept (the oldest results go first);
- time: a reward call running longer than `batch_timeout_s` fails its jobs with that error and goes on in its own
  daemon thread (a stuck call never blocks a restart); `/health` says "degraded" while calls are stuck, and "stuck"
  (503) past `max_stuck_batches`, when new work is refused and queued work fails at once;
- connections: at most `max_connections`; past it a new connection makes room by closing, in this order, the
  oldest connection that has never sent a byte, the one idle longest between requests, the one stalled longest in a
  request without the right token (headers incomplete, or a wrong token); an authenticated request being uploaded or
  answered is never closed for room (if nothing else can go, the new connection is closed). A connection must
  deliver each whole request within `request_timeout_s` of being opened or answered.
A reward that raises fails its jobs; when several requests shared the failing call, each is scored alone again, so
only the guilty request fails. The token is compared in constant time and never logged, nor are query strings.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..rewards import compute_rewards, reward_name
from .wire import PayloadError, ScoreRequest, check_lengths, check_token, decode_samples, to_unit_floats

logger = logging.getLogger(__name__)

# A JSON string, or an unterminated one up to the end of the body. Every character has one way to match, and a match
# never fails once started, so a scan is linear whatever the body (an unterminated string with many escaped quotes
# made the plain pattern restart at every quote: quadratic).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)


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
        self.status, self.scores, self.error, self.finished_at = status, scores, error, time.monotonic()
        self.samples = self.prompts = self.columns = None  # a finished job holds its scores, nothing else


@dataclass
class ServerLimits:
    """Bounds of one server. Defaults suit a GPU reward model scoring 512-px images."""

    max_request_bytes: int = 64 * 2**20  # ~ 80 images of 512x512 after base64
    max_inflight_upload_bytes: int = 512 * 2**20  # bodies being received or parsed at once, by declared length
    max_json_values: int = 200_000  # JSON values (list items, keys) in one body: bounds the cost of parsing it
    max_samples_per_request: int = 1024
    max_batch_samples: int = 64  # micro-batch size across requests
    max_wait_ms: float = 10.0  # how long the first queued job waits for company
    max_pending_jobs: int = 256  # jobs queued or being scored; past it, 503 with Retry-After
    max_pending_bytes: int = 2 * 2**30  # their uint8 pixels; past it, 503 with Retry-After
    result_ttl_s: float = 600.0
    max_stored_scores: int = 2_000_000  # scores of finished results kept for polling (~64 MB); the oldest go first
    batch_timeout_s: float = 600.0  # a reward call running longer fails its jobs
    max_stuck_batches: int = 2  # reward calls still running past their limit; past it, new work is refused
    max_connections: int = 256
    request_timeout_s: float = 60.0  # a connection must deliver each whole request within this

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ServerLimits.{name} must be a positive finite number, got {value!r}.")


class _RewardTimeout(Exception):
    pass


@dataclass
class _State:
    jobs: dict[str, Job] = field(default_factory=dict)
    finished: OrderedDict = field(default_factory=OrderedDict)  # job ids in the order they finished
    queue: asyncio.Queue | None = None
    stuck: set = field(default_factory=set)  # reward calls still running past batch_timeout_s
    pending: int = 0
    held_bytes: int = 0
    uploading_bytes: int = 0  # reserved by bodies being received or parsed
    stored_scores: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "batches": 0, "samples": 0})


def count_json_values(body: bytes) -> int:
    """An upper bound on the JSON values and keys of `body`, without parsing it: the separators outside strings."""
    stripped = _JSON_STRING.sub(b'""', body)
    return sum(stripped.count(token) for token in (b",", b"[", b"{", b":"))


def create_app(reward_fn: Callable, token: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `reward_fn` behind bearer `token` (uvicorn runs it; tests too). `token` must be at
    least `MIN_TOKEN_CHARS` characters of printable ASCII (`ValueError` otherwise), whichever way the server starts."""
    check_server_token(token, "the reward server's token (token=)")
    limits = limits or ServerLimits()
    name = reward_name(reward_fn)
    state = _State()
    expected = f"Bearer {token}".encode()

    def score_batch(pixels: torch.Tensor, prompts: list[str], columns: dict[str, list]) -> list[float | None]:
        """The reward on one concatenated batch (a worker thread); non-finite scores become None (invalid)."""
        scores = compute_rewards([reward_fn], to_unit_floats(pixels), prompts, columns)[:, 0].tolist()
        return [s if math.isfinite(s) else None for s in scores]

    async def call_reward(jobs: list[Job]) -> list[float | None]:
        """Run the reward on `jobs` in a daemon thread of its own; `_RewardTimeout` past `batch_timeout_s` (the call
        then goes on in its thread, counted as stuck until it returns, and its late result is dropped)."""
        pixels = torch.cat([job.samples for job in jobs])
        prompts = [p for job in jobs for p in job.prompts]
        columns = {key: [v for job in jobs for v in job.columns[key]] for key in jobs[0].columns}
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result, error) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

        def work() -> None:
            try:
                result, error = score_batch(pixels, prompts, columns), None
            except BaseException as err:  # noqa: BLE001 — handed to the event loop, which fails the jobs
                result, error = None, err
            loop.call_soon_threadsafe(settle, result, error)

        # A daemon thread per call, not a pool: a call that never returns must not keep the process from exiting.
        threading.Thread(target=work, name="ddrl-reward-call", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), limits.batch_timeout_s)
        except asyncio.TimeoutError:
            state.stuck.add(future)
            future.add_done_callback(state.stuck.discard)
            raise _RewardTimeout from None

    def finish(job: Job, status: str, scores=None, error=None) -> None:
        """Record a job's result, free its samples, and keep at most `max_stored_scores` scores of results."""
        state.pending -= 1
        state.held_bytes -= job.nbytes
        job.finish(status, scores, error)
        state.finished[job.job_id] = None
        state.stored_scores += job.size
        while state.stored_scores > limits.max_stored_scores:
            forget_oldest_result()

    def forget_oldest_result() -> None:
        job = state.jobs.pop(state.finished.popitem(last=False)[0], None)
        state.stored_scores -= job.size if job is not None else 0

    def stuck() -> bool:
        return len(state.stuck) >= limits.max_stuck_batches

    async def run_batch(jobs: list[Job]) -> None:
        if stuck():  # calls that never return hold the reward: new ones would hang too
            for job in jobs:
                finish(
                    job,
                    "error",
                    error=f"the reward is stuck ({len(state.stuck)} calls have run past "
                    f"batch_timeout_s={limits.batch_timeout_s:g} s); restart the server",
                )
            return
        for job in jobs:
            job.status = "running"
        try:
            scores = await call_reward(jobs)
        except _RewardTimeout:
            logger.error(
                "reward %s did not finish a batch of %d requests within %.0f s",
                name,
                len(jobs),
                limits.batch_timeout_s,
            )
            for job in jobs:
                finish(
                    job,
                    "error",
                    error=f"the reward did not finish within batch_timeout_s={limits.batch_timeout_s:g} s",
                )
            return
        except Exception as err:  # noqa: BLE001 — a failing reward fails its jobs, not the server
            if len(jobs) > 1:  # find the guilty request: score each one alone
                logger.warning(
                    "reward %s failed on a batch of %d requests (%s); scoring them one by one", name, len(jobs), err
                )
                for job in jobs:
                    await run_batch([job])
                return
            logger.exception("reward %s failed on a request of %d samples", name, jobs[0].size)
            finish(jobs[0], "error", error=f"{type(err).__name__}: {err}")
            return
        state.counters["batches"] += 1
        state.counters["samples"] += sum(job.size for job in jobs)
        start = 0
        for job in jobs:
            finish(job, "done", scores=scores[start : start + job.size])
            start += job.size

    async def batcher() -> None:
        """Take the first queued job, gather more for up to `max_wait_ms` or `max_batch_samples`, score them."""
        loop = asyncio.get_running_loop()
        # A get() that timed out is kept for the next round, never cancelled (cancelling a finished get drops a job).
        pending = None
        while True:
            batch = [await (pending or state.queue.get())]
            pending = None
            size, deadline = batch[0].size, loop.time() + limits.max_wait_ms / 1000
            while size < limits.max_batch_samples and (remaining := deadline - loop.time()) > 0:
                pending = asyncio.ensure_future(state.queue.get())
                done, _ = await asyncio.wait({pending}, timeout=remaining)
                if not done:
                    break
                batch.append(pending.result())
                pending = None
                size += batch[-1].size
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.batch_key(), []).append(job)
            for jobs in groups.values():
                await run_batch(jobs)

    async def expire_results() -> None:
        """Drop finished results older than `result_ttl_s`, on a timer (not only when a request comes in)."""
        interval = min(max(limits.result_ttl_s / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - limits.result_ttl_s
            while state.finished:
                job = state.jobs.get(next(iter(state.finished)))
                if job is not None and job.finished_at >= cutoff:
                    break
                forget_oldest_result()

    @asynccontextmanager
    async def lifespan(_app):
        state.queue = asyncio.Queue()
        tasks = [asyncio.create_task(batcher()), asyncio.create_task(expire_results())]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(
        title=f"ddrl-trl reward service: {name}", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def refuse_if_busy() -> None:
        if stuck():
            raise HTTPException(
                503,
                f"the reward is stuck: {len(state.stuck)} calls have run past batch_timeout_s="
                f"{limits.batch_timeout_s:g} s; restart the server",
                headers={"Retry-After": "30"},
            )
        if state.pending >= limits.max_pending_jobs:
            raise HTTPException(
                503,
                f"{state.pending} jobs are waiting to be scored (max_pending_jobs="
                f"{limits.max_pending_jobs}); retry later",
                headers={"Retry-After": "1"},
            )
        if state.held_bytes >= limits.max_pending_bytes:
            raise HTTPException(
                503,
                f"{state.held_bytes} bytes of samples are waiting to be scored (max_pending_bytes="
                f"{limits.max_pending_bytes}); retry later",
                headers={"Retry-After": "1"},
            )

    def reserve_upload(request: Request) -> int:
        """Reserve the body's bytes in the budget of uploads in flight, before any of it is read: its declared
        length (a body of undeclared length reserves the most it may hold); 413 or 503 (Retry-After) if it does not
        fit."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_request_bytes):
            raise HTTPException(413, f"request body over the limit of {limits.max_request_bytes} bytes")
        budget = limits.max_inflight_upload_bytes
        size = int(declared) if declared is not None else min(limits.max_request_bytes, budget)
        if size > budget:
            raise HTTPException(
                413,
                f"a {size}-byte body is over max_inflight_upload_bytes={budget} (the bytes of uploads the server "
                f"receives at once) on its own: send smaller batches",
            )
        if state.uploading_bytes + size > budget:
            raise HTTPException(
                503,
                f"{state.uploading_bytes} bytes of other uploads are being received; {size} more would pass "
                f"max_inflight_upload_bytes={budget}; retry later",
                headers={"Retry-After": "1"},
            )
        state.uploading_bytes += size
        return size

    async def read_body(request: Request, limit: int) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"request body over the limit of {limit} bytes")
        return bytes(body)

    def parse(body: bytes) -> tuple[ScoreRequest, torch.Tensor]:
        """The request and its samples (run in a thread: big bodies take a moment); HTTPException if unfit."""
        values = count_json_values(body)
        if values > limits.max_json_values:
            raise HTTPException(
                413, f"request body holds about {values} JSON values, over the limit of {limits.max_json_values}"
            )
        try:
            payload = ScoreRequest.model_validate_json(body)
        except ValidationError as err:
            if any(e["type"] == "json_invalid" for e in err.errors()):
                raise HTTPException(400, "request body is not valid JSON") from None
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
            raise HTTPException(422, f"malformed score request: {problems}") from None
        if payload.images.shape[0] > limits.max_samples_per_request:
            raise HTTPException(
                413, f"{payload.images.shape[0]} samples over the limit of {limits.max_samples_per_request}"
            )
        try:
            samples = decode_samples(payload.images)
            check_lengths(payload, samples.shape[0])
        except PayloadError as err:
            raise HTTPException(422, f"malformed score request: {err}") from None
        return payload, samples

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "stuck" if stuck() else "degraded" if state.stuck else "ok"
        body = {
            "status": status,
            "reward": name,
            "queued": state.queue.qsize(),
            "pending_jobs": state.pending,
            "stored_results": len(state.finished),
            "stored_scores": state.stored_scores,
            "held_bytes": state.held_bytes,
            "uploading_bytes": state.uploading_bytes,
            "stuck_batches": len(state.stuck),
            **state.counters,
        }
        return JSONResponse(body, status_code=503 if status == "stuck" else 200)

    @app.post("/v1/score", status_code=202)
    async def submit(request: Request) -> dict:
        authorize(request)
        refuse_if_busy()
        reserved = reserve_upload(request)
        try:  # the reservation holds until the body is parsed and dropped (or the client goes away)
            body = await read_body(request, reserved)
            payload, samples = await asyncio.to_thread(parse, body)
            del body
        finally:
            state.uploading_bytes -= reserved
        refuse_if_busy()  # again: others may have queued while this body was read and parsed
        job = Job(uuid.uuid4().hex, samples, payload.prompts, payload.columns)
        state.jobs[job.job_id] = job
        state.pending += 1
        state.held_bytes += job.nbytes
        state.counters["requests"] += 1
        await state.queue.put(job)
        return {"id": job.job_id, "status": "queued"}

    @app.get("/v1/score/{job_id}")
    async def result(job_id: str, request: Request) -> JSONResponse:
        authorize(request)
        job = state.jobs.get(job_id)
        if job is None:
            raise HTTPException(
                404, f"no job {job_id!r} (unknown, or finished more than {limits.result_ttl_s:.0f} s ago)"
            )
        return JSONResponse({"id": job_id, "status": job.status, "scores": job.scores, "error": job.error})

    return app


def guarded_protocol(limits: ServerLimits, token: str) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection limit and a request deadline (uvicorn has neither: a connection that
    sends nothing, or half a request, stays open forever, and enough of them lock every client out).

    Past `max_connections`, a new connection makes room by closing another, in the order of `_eviction_rank`: first
    the oldest that has never sent a byte, then the one idle longest between requests, then the one stalled longest
    in a request without the right token. A connection uploading an authenticated request, or whose whole request is
    with the app, is never closed for room: if only those remain, the new connection is the one closed."""
    expected = f"Bearer {token}".encode()

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._opened_at = self._quiet_since = self.loop.time()
            self._spoken = False  # sent a byte yet
            if len(self.connections) > limits.max_connections:
                ranked = [
                    (rank, c)
                    for c in self.connections
                    if c is not self and not c.transport.is_closing() and (rank := c._eviction_rank()) is not None
                ]
                victim = min(ranked, key=lambda pair: pair[0])[1] if ranked else self
                victim.transport.close()
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._spoken = True
            self._quiet_since = self.loop.time()
            super().data_received(data)

        def _eviction_rank(self) -> tuple[int, float] | None:
            """The lowest rank is closed first to make room; None: never closed for room."""
            if not self._spoken:
                return 0, self._opened_at  # never sent a byte: the oldest goes first
            if not self._waiting_for_request():
                return None  # its whole request is with the app
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                return 1, self._quiet_since  # idle between requests
            if self._uploading_with_token():
                return None  # an authenticated upload: bounded by request_timeout_s, never closed for room
            return 2, self._quiet_since  # headers still arriving, or a body without the right token

        def _uploading_with_token(self) -> bool:
            if self.cycle is None or self.cycle.response_complete or self.conn.their_state is not h11.SEND_BODY:
                return False
            given = next((value for name, value in self.headers if name == b"authorization"), b"")
            return hmac.compare_digest(given, expected)

        def _waiting_for_request(self) -> bool:
            """No complete request of this connection is with the app: idle, or a request still arriving."""
            return self.cycle is None or self.cycle.response_complete or self.conn.their_state is not h11.DONE

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(limits.request_timeout_s, self._deadline_passed)

        def _deadline_passed(self) -> None:
            self._timer = None
            if not self.transport.is_closing() and self._waiting_for_request():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._quiet_since = self.loop.time()
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class RedactQueryStrings(logging.Filter):
    """Keep query strings out of uvicorn's access log: a token sent as `?token=` would otherwise be logged in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True


#: The shortest bearer token the server accepts: a short one can be guessed (the server does not limit attempts).
MIN_TOKEN_CHARS = 16
#: How to make a good token (43 characters).
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def check_server_token(token: str, source: str, make_one: str = f"`{MAKE_TOKEN}`") -> None:
    """Raise `ValueError` naming `source` unless `token` can be a bearer token (`wire.check_token`) and is at least
    `MIN_TOKEN_CHARS` characters long; `make_one` says how to make one."""
    check_token(token, source)
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{source[:1].upper()}{source[1:]} holds a {len(token)}-character token: use at least {MIN_TOKEN_CHARS} "
            f"characters, a random secret that cannot be guessed, e.g. {make_one} (43 characters)."
        )


def read_token_file(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace stripped); a clear error if missing, empty, unusable or
    shorter than `MIN_TOKEN_CHARS` (checked here, before the reward model loads, and again by `create_app`)."""
    make_one = f"`{MAKE_TOKEN} > {path}`"
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"Cannot read the token file {path!r} ({err}). Write a secret into it, e.g. {make_one}."
        ) from err
    check_server_token(token, f"the token file {path!r}", make_one)
    return token


def serve(reward_fn: Callable, token: str, host: str, port: int, limits: ServerLimits | None = None) -> None:
    """Serve `reward_fn` behind bearer `token` with uvicorn until interrupted (`ddrl-trl serve-reward` reads the token
    file and resolves the reward first, so that bad input fails before anything starts)."""
    import uvicorn

    limits = limits or ServerLimits()
    logging.getLogger("uvicorn.access").addFilter(RedactQueryStrings())
    logger.info("serving reward %s on http://%s:%d", reward_name(reward_fn), host, port)
    uvicorn.run(
        create_app(reward_fn, token, limits),
        host=host,
        port=port,
        log_level="info",
        http=guarded_protocol(limits, token),
    )
