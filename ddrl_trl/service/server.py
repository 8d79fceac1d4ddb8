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
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..rewards import reward_name
from .connections import RedactQueryStrings, guarded_protocol
from .scoring import Job, Scorer
from .wire import PayloadError, ScoreRequest, check_lengths, check_token, decode_samples

logger = logging.getLogger(__name__)

# A JSON string, or an unterminated one up to the end of the body. Every character has one way to match, and a match
# never fails once started, so a scan is linear whatever the body (an unterminated string with many escaped quotes
# made the plain pattern restart at every quote: quadratic).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)


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


#: The bounds on work waiting to be scored, checked before and after a body is read: the `scoring._State` counter, its
#: `ServerLimits` field, and the 503's message (Retry-After: 1) once the counter reaches the limit.
_PENDING_LIMITS = (
    ("pending", "max_pending_jobs", "{value} jobs are waiting to be scored (max_pending_jobs={limit}); retry later"),
    (
        "held_bytes",
        "max_pending_bytes",
        "{value} bytes of samples are waiting to be scored (max_pending_bytes={limit}); retry later",
    ),
)


def count_json_values(body: bytes) -> int:
    """An upper bound on the JSON values and keys of `body`, without parsing it: the separators outside strings."""
    stripped = _JSON_STRING.sub(b'""', body)
    return sum(stripped.count(token) for token in (b",", b"[", b"{", b":"))


def _unavailable(detail: str, retry_after: str = "1") -> HTTPException:
    """A 503 telling the client to retry after `retry_after` seconds."""
    return HTTPException(503, detail, headers={"Retry-After": retry_after})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, read in chunks; 413 as soon as it passes `limit` bytes, before the rest is read."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body over the limit of {limit} bytes")
    return bytes(body)


class _Service(Scorer):
    """One server: its scorer behind the checks each request passes (token, busy, upload budget, body) and the
    route handlers `_ROUTES` names."""

    def __init__(self, reward_fn: Callable, token: str, limits: ServerLimits):
        super().__init__(reward_fn, limits)
        self.expected = f"Bearer {token}".encode()

    def authorize(self, request: Request) -> None:
        """401 unless the request carries the bearer token (compared in constant time)."""
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self.expected):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def refuse_if_busy(self) -> None:
        """503 with Retry-After while the reward is stuck, or work waiting to be scored is at a `_PENDING_LIMITS`."""
        if self.is_stuck():
            raise _unavailable(
                f"the reward is stuck: {len(self.state.stuck)} calls have run past batch_timeout_s="
                f"{self.limits.batch_timeout_s:g} s; restart the server",
                retry_after="30",
            )
        for counter, limit_name, message in _PENDING_LIMITS:
            value, limit = getattr(self.state, counter), getattr(self.limits, limit_name)
            if value >= limit:
                raise _unavailable(message.format(value=value, limit=limit))

    def reserve_upload(self, request: Request) -> int:
        """Reserve the body's bytes in the budget of uploads in flight, before any of it is read: its declared
        length (a body of undeclared length reserves the most it may hold); 413 or 503 (Retry-After) if it does not
        fit."""
        limits, state = self.limits, self.state
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
            raise _unavailable(
                f"{state.uploading_bytes} bytes of other uploads are being received; {size} more would pass "
                f"max_inflight_upload_bytes={budget}; retry later"
            )
        state.uploading_bytes += size
        return size

    def parse(self, body: bytes) -> tuple[ScoreRequest, torch.Tensor]:
        """The request and its samples (run in a thread: big bodies take a moment); HTTPException if unfit."""
        values = count_json_values(body)
        if values > self.limits.max_json_values:
            raise HTTPException(
                413, f"request body holds about {values} JSON values, over the limit of {self.limits.max_json_values}"
            )
        payload = _validate(body)
        if payload.images.shape[0] > self.limits.max_samples_per_request:
            raise HTTPException(
                413, f"{payload.images.shape[0]} samples over the limit of {self.limits.max_samples_per_request}"
            )
        try:
            samples = decode_samples(payload.images)
            check_lengths(payload, samples.shape[0])
        except PayloadError as err:
            raise HTTPException(422, f"malformed score request: {err}") from None
        return payload, samples

    async def health(self) -> JSONResponse:
        """`GET /health`: the status and counters (503 while stuck); no token needed."""
        state = self.state
        status = "stuck" if self.is_stuck() else "degraded" if state.stuck else "ok"
        body = {
            "status": status,
            "reward": self.name,
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

    async def submit(self, request: Request) -> dict:
        """`POST /v1/score`: check, read and parse the body, queue its job; 202 with the job id."""
        self.authorize(request)
        self.refuse_if_busy()
        reserved = self.reserve_upload(request)
        try:  # the reservation holds until the body is parsed and dropped (or the client goes away)
            body = await _read_body(request, reserved)
            payload, samples = await asyncio.to_thread(self.parse, body)
            del body
        finally:
            self.state.uploading_bytes -= reserved
        self.refuse_if_busy()  # again: others may have queued while this body was read and parsed
        job = Job(uuid.uuid4().hex, samples, payload.prompts, payload.columns)
        state = self.state
        state.jobs[job.job_id] = job
        state.pending += 1
        state.held_bytes += job.nbytes
        state.counters["requests"] += 1
        await state.queue.put(job)
        return {"id": job.job_id, "status": "queued"}

    async def result(self, job_id: str, request: Request) -> JSONResponse:
        """`GET /v1/score/{job_id}`: the job's status, and its scores or error once finished."""
        self.authorize(request)
        job = self.state.jobs.get(job_id)
        if job is None:
            raise HTTPException(
                404, f"no job {job_id!r} (unknown, or finished more than {self.limits.result_ttl_s:.0f} s ago)"
            )
        return JSONResponse({"id": job_id, "status": job.status, "scores": job.scores, "error": job.error})


def _validate(body: bytes) -> ScoreRequest:
    """The body as a `ScoreRequest`: 400 if it is not JSON, 422 naming the first problems if it does not fit."""
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError as err:
        if any(e["type"] == "json_invalid" for e in err.errors()):
            raise HTTPException(400, "request body is not valid JSON") from None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise HTTPException(422, f"malformed score request: {problems}") from None


#: The routes served: (method, path, `_Service` handler, status code of a success; None: the handler's own).
_ROUTES = (
    ("GET", "/health", "health", None),
    ("POST", "/v1/score", "submit", 202),
    ("GET", "/v1/score/{job_id}", "result", None),
)


def create_app(reward_fn: Callable, token: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `reward_fn` behind bearer `token` (uvicorn runs it; tests too). `token` must be at
    least `MIN_TOKEN_CHARS` characters of printable ASCII (`ValueError` otherwise), whichever way the server starts."""
    check_server_token(token, "the reward server's token (token=)")
    service = _Service(reward_fn, token, limits or ServerLimits())
    app = FastAPI(
        title=f"ddrl-trl reward service: {service.name}",
        lifespan=service.lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    for method, path, handler, status_code in _ROUTES:
        app.add_api_route(path, getattr(service, handler), methods=[method], status_code=status_code)
    return app


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
