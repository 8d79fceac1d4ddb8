"""`RemoteReward`: a reward function for `reward_funcs` that scores on a `ddrl-trl serve-reward` server."""

from __future__ import annotations

import logging
import os
import time

import requests
import torch

from .wire import check_token, encode_samples, json_columns

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteReward:
    """Score samples on a reward server: submit the batch, get a job id, poll until the scores are ready.

    Connection failures, timeouts and 5xx/429 answers are retried with exponential backoff (`backoff`, 2·`backoff`,
    4·`backoff`, …, `retries` times, longer when the server sends Retry-After); then the call fails with a
    `ConnectionError` naming the URL and what the server last said. A rejected token (401) or a rejected request
    (4xx) fails at once with the server's message. A job the server no longer knows (it restarted and lost its queue)
    is submitted once more. Dataset columns that are not JSON (e.g. images) are not sent.

    Args:
        url: the server's base URL, e.g. `"http://10.0.0.7:8000"`.
        token: the bearer token; or `token_file`, a file holding it (the server's `--token-file`).
        timeout: seconds one HTTP request may take, and the longest a job may stay unfinished.
        retries: retries of a failed HTTP request before giving up.
        backoff: the first retry's delay in seconds, doubled at each retry.
        poll_interval: the first delay between polls, growing ×1.5 up to 0.5 s.
        name: the name logged as `rewards/<name>/...` (default: "remote"; name each one when several servers score).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 0.5,
        poll_interval: float = 0.02,
        name: str | None = None,
    ):
        if (token is None) == (token_file is None):
            raise ValueError("RemoteReward needs exactly one of token= or token_file=.")
        if token_file is not None:
            with open(token_file, encoding="utf-8") as file:
                token = file.read().strip()
        check_token(token, f"RemoteReward's token{f' (from {token_file})' if token_file is not None else ''}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.poll_interval = timeout, retries, backoff, poll_interval
        self.__name__ = name or "remote"
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:  # never shows the token
        return f"RemoteReward(url={self.url!r}, name={self.__name__!r})"

    def __call__(self, images: torch.Tensor, prompts: list[str], **columns) -> list[float | None]:
        payload = {"images": encode_samples(images), "prompts": list(prompts), "columns": json_columns(columns)}
        deadline = time.monotonic() + self.timeout
        job_id = self._request("POST", "/v1/score", json=payload)["id"]
        resubmitted, delay = False, self.poll_interval
        while True:
            try:
                status = self._request("GET", f"/v1/score/{job_id}")
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
                job_id, resubmitted = self._request("POST", "/v1/score", json=payload)["id"], True
                continue
            if status["status"] == "done":
                return status["scores"]
            if status["status"] == "error":
                raise RuntimeError(f"The reward service at {self.url} failed to score the batch: {status['error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"The reward service at {self.url} did not finish job {job_id} in {self.timeout} s."
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _request(self, method: str, path: str, **kwargs) -> dict:
        """One HTTP exchange, retried with exponential backoff on transient failures."""
        start, delay, last, answered = time.monotonic(), self.backoff, None, False
        for attempt in range(self.retries + 1):
            wait = delay
            try:
                response = self._session.request(method, self.url + path, timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as err:
                last, answered = f"{type(err).__name__}: {err}", False
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
                last, answered = f"HTTP {response.status_code}: {detail}", True
                wait = max(delay, _retry_after(response))
            if attempt < self.retries:
                logger.warning(
                    "reward service %s: %s; retry %d/%d in %.2f s", self.url, last, attempt + 1, self.retries, wait
                )
                time.sleep(wait)
                delay *= 2
        elapsed = time.monotonic() - start
        if answered:
            raise ConnectionError(
                f"The reward service at {self.url} answered {method} {path} with an error {self.retries + 1} times "
                f"over {elapsed:.1f} s; it said: {last}. The server is up: see its log for the cause."
            )
        raise ConnectionError(
            f"The reward service at {self.url} did not answer {method} {path} after {self.retries + 1} attempts over "
            f"{elapsed:.1f} s with exponential backoff (last: {last}). Check that `ddrl-trl serve-reward` is running "
            f"and reachable at {self.url}."
        )


class _UnknownJob(Exception):
    """The server answered 404 for a job id: it does not know (or no longer holds) the job."""


def _retry_after(response: requests.Response) -> float:
    """The server's Retry-After in seconds (0 if absent or not a number of seconds), capped at 60."""
    try:
        return min(max(float(response.headers.get("Retry-After", 0)), 0.0), 60.0)
    except ValueError:
        return 0.0


def _detail(response: requests.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]
