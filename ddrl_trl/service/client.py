"""`RemoteReward`: a reward function for `reward_funcs` that scores on a `ddrl-trl serve-reward` server."""

from __future__ import annotations

import logging
import math
import os
import time

import requests
import torch

from .wire import check_token, encode_samples, json_columns

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


_MAX_BACKOFF_S = 30.0  # the longest delay between two retries (the backoff doubles up to it)
_MIN_HTTP_TIMEOUT_S = 0.05  # the shortest a last attempt may wait for an answer
_RESUME_HINT = (
    "The training run can be resumed from its last checkpoint once the service is back: "
    "`--resume_from_checkpoint latest` (example scripts, `ddrl-trl train`) or "
    "`trainer.train(resume_from_checkpoint=True)`."
)


class _UnknownJob(Exception):
    """The server answered 404 for a job id: it does not know (or no longer holds) the job."""


class RemoteReward:
    """Score samples on a reward server: submit the batch, get a job id, poll until the scores are ready.

    Connection failures, timeouts and 5xx/429 answers are retried with exponential backoff (`backoff`, 2·`backoff`,
    4·`backoff`, … up to 30 s; longer when the server sends Retry-After) for up to `retry_budget_s` seconds per HTTP
    exchange (5 minutes by default: long enough for a reward server to restart), and never past the call's `timeout`:
    no wait, Retry-After included, goes beyond either. Then the call fails with a `ConnectionError` naming the URL,
    how long it tried, what the server last said (or that it never answered), and how to resume the training run
    from its last checkpoint. A rejected token (401) or a rejected request (4xx) fails at once with the server's
    message. A job the server no longer knows (it restarted and lost its queue) is submitted once more. Dataset
    columns that are not JSON (e.g. images) are not sent.

    Args:
        url: the server's base URL, e.g. `"http://10.0.0.7:8000"`.
        token: the bearer token; or `token_file`, a file holding it (the server's `--token-file`).
        timeout: the longest one call may take in all (submitting, scoring, polling and retries), in seconds; also
            the longest one HTTP request may wait.
        retries: optionally, the most retries of one failed HTTP request (default None: as many as
            `retry_budget_s` allows).
        backoff: the first retry's delay in seconds, doubled at each retry up to 30 s.
        poll_interval: the first delay between polls, growing ×1.5 up to 0.5 s.
        name: the name logged as `rewards/<name>/...` (default: "remote"; name each one when several servers score).
        retry_budget_s: how long one failing HTTP exchange is retried, in seconds (default 300).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        timeout: float = 600.0,
        retries: int | None = None,
        backoff: float = 0.5,
        poll_interval: float = 0.02,
        name: str | None = None,
        retry_budget_s: float = 300.0,
    ):
        if (token is None) == (token_file is None):
            raise ValueError("RemoteReward needs exactly one of token= or token_file=.")
        for arg, value, example in (
            ("timeout", timeout, "600"),
            ("retry_budget_s", retry_budget_s, "300 (retry for 5 minutes)"),
            ("backoff", backoff, "0.5"),
            ("poll_interval", poll_interval, "0.02"),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"RemoteReward({arg}={value!r}): must be a finite number of seconds > 0, e.g. {example}."
                )
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise ValueError(
                f"RemoteReward(retries={retries!r}): must be None (retry for retry_budget_s) or an int >= 0."
            )
        if token_file is not None:
            with open(token_file, encoding="utf-8") as file:
                token = file.read().strip()
        check_token(token, f"RemoteReward's token{f' (from {token_file})' if token_file is not None else ''}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.poll_interval = timeout, retries, backoff, poll_interval
        self.retry_budget_s = retry_budget_s
        self.__name__ = name or "remote"
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:  # never shows the token
        return f"RemoteReward(url={self.url!r}, name={self.__name__!r})"

    def __call__(self, images: torch.Tensor, prompts: list[str], **columns) -> list[float | None]:
        payload = {"images": encode_samples(images), "prompts": list(prompts), "columns": json_columns(columns)}
        deadline = time.monotonic() + self.timeout
        job_id = self._request("POST", "/v1/score", deadline, json=payload)["id"]
        resubmitted, delay = False, self.poll_interval
        while True:
            try:
                status = self._request("GET", f"/v1/score/{job_id}", deadline)
            except _UnknownJob:
                if resubmitted:
                    raise RuntimeError(
                        f"The reward service at {self.url} lost job {job_id} twice (it answered 404 for a job it had "
                        f"accepted): it is restarting repeatedly, or its result_ttl_s is shorter than scoring takes."
                    ) from None
                logger.warning(
                    "reward service %s no longer knows job %s (restarted?); submitting the batch again",
                    self.url,
                    job_id,
                )
                job_id, resubmitted = self._request("POST", "/v1/score", deadline, json=payload)["id"], True
                continue
            if status["status"] == "done":
                return status["scores"]
            if status["status"] == "error":
                raise RuntimeError(f"The reward service at {self.url} failed to score the batch: {status['error']}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"The reward service at {self.url} did not finish job {job_id} within RemoteReward's "
                    f"timeout={self.timeout:g} s (the job was still {status['status']}; the server's /health says "
                    f"whether its reward is stuck). {_RESUME_HINT}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.5)

    def _request(self, method: str, path: str, deadline: float, **kwargs) -> dict:
        """One HTTP exchange, retried with exponential backoff on transient failures for up to `retry_budget_s`, and
        never past `deadline` (the call's timeout)."""
        start = time.monotonic()
        give_up_at = min(start + self.retry_budget_s, deadline)
        delay, attempts, answers, last, said, answered = self.backoff, 0, 0, None, None, False
        while True:
            attempts += 1
            # Each attempt may wait for its answer until the call's deadline at most (a last one, a moment).
            http_timeout = min(self.timeout, max(deadline - time.monotonic(), _MIN_HTTP_TIMEOUT_S))
            try:
                response = self._session.request(method, self.url + path, timeout=http_timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as err:
                last, wait, answered = f"{type(err).__name__}: {err}", delay, False
            else:
                if response.status_code < 400:
                    return response.json()
                detail = _detail(response)
                if response.status_code == 401:
                    raise PermissionError(f"The reward service at {self.url} rejected the token (401): {detail}")
                if response.status_code == 404 and method == "GET":
                    raise _UnknownJob(detail)
                if response.status_code not in _RETRYABLE_STATUS:
                    raise ValueError(
                        f"The reward service at {self.url} refused {method} {path} ({response.status_code}): {detail}"
                    )
                last = said = f"HTTP {response.status_code}: {detail}"
                answered, answers = True, answers + 1
                wait = max(delay, _retry_after(response))
            remaining = give_up_at - time.monotonic()
            if remaining <= 0 or (self.retries is not None and attempts > self.retries):
                break
            wait = min(wait, remaining)  # never past the budget or the call's timeout, whatever Retry-After says
            logger.warning("reward service %s: %s; retry %d in %.2f s", self.url, last, attempts, wait)
            time.sleep(wait)
            delay = min(delay * 2, _MAX_BACKOFF_S)
        elapsed = time.monotonic() - start
        if self.retries is not None and attempts > self.retries and remaining > 0:
            why = f"retries={self.retries} used up"
        elif give_up_at < start + self.retry_budget_s:
            why = f"the call's timeout={self.timeout:g} s ran out"
        else:
            why = f"retry_budget_s={self.retry_budget_s:g} ran out"
        if answered:  # the last attempt was answered with an error
            raise ConnectionError(
                f"The reward service at {self.url} answered {method} {path} with an error {answers} times in "
                f"{attempts} attempts over {elapsed:.1f} s ({why}); it said: {said}. The server is up: see its log "
                f"for the cause. {_RESUME_HINT}"
            )
        earlier = f" Before that, it said: {said}." if said is not None else ""
        raise ConnectionError(
            f"The reward service at {self.url} did not answer {method} {path} after {attempts} attempts over "
            f"{elapsed:.1f} s ({why}; last: {last}).{earlier} Check that `ddrl-trl serve-reward` is running and "
            f"reachable at {self.url}. {_RESUME_HINT}"
        )


def _retry_after(response: requests.Response) -> float:
    """The server's Retry-After in seconds (0 if absent or not a number of seconds), capped at 60."""
    try:
        return min(max(float(response.headers.get("Retry-After", 0)), 0.0), 60.0)
    except ValueError:
        return 0.0


def _detail(response: requests.Response) -> str:
    """What the server said: the `detail` of its JSON answer, else the start of its text."""
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]
