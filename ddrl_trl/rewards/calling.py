"""How reward functions are called, and what they may return (docs/rewards.md, "The contract").

A reward function is called with keywords, TRL's `GRPOTrainer` way, when its signature takes them:

    reward(images=..., prompts=..., completions=..., trainer_state=..., **columns)

`completions` is the same samples as `images` (the name TRL's text rewards use), `trainer_state` the trainer's
`transformers.TrainerState` (for rewards that change with training progress), `columns` every other dataset column;
`log_metric(name, value)` and `log_extra(column, values)` are there too, as TRL passes them.
A function receives the keywords it names, or all of them if it takes `**kwargs`. A function whose first two
parameters have other names (`def reward(imgs, texts, **kwargs)`) is called positionally, `reward(images, prompts,
trainer_state=..., **columns)`, as before.

`async def` rewards (or callables with an async `__call__`) run concurrently with each other on one event loop per
process, in a daemon thread, while the synchronous ones run in the calling thread; scores come back in the order of
`reward_funcs` either way.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

#: The samples, under both names rewards use for them.
SAMPLE_KEYWORDS = ("images", "prompts", "completions")
#: Keyword arguments every reward may take (TRL's GRPOTrainer passes the last three too); a dataset column must not
#: use these names.
RESERVED_KEYWORDS = (*SAMPLE_KEYWORDS, "trainer_state", "log_metric", "log_extra")

RewardFunc = Callable[..., Sequence]

_KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, _KEYWORD_ONLY)
_POSITIONAL_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def reward_name(func: RewardFunc) -> str:
    """The name a reward function is logged under (`rewards/<name>/mean`)."""
    return getattr(func, "__name__", None) or type(func).__name__


def check_column_names(column_names: Sequence[str], split: str) -> None:
    """Refuse dataset columns named like the keywords every reward gets (they would be passed twice)."""
    clashes = [name for name in column_names if name in RESERVED_KEYWORDS]
    if clashes:
        raise ValueError(
            f"The {split} dataset has column(s) {clashes}, named like the keywords every reward function receives "
            f"({', '.join(RESERVED_KEYWORDS)}). Rename them (dataset.rename_column) so rewards can tell them apart."
        )


def _ignore(*args, **kwargs) -> None:
    """`log_metric` / `log_extra` where nothing records them (outside a trainer)."""


def call_arguments(
    func: RewardFunc, images, prompts: list[str], columns: dict[str, list], context: dict[str, Any] | None = None
) -> tuple[tuple, dict]:
    """`(args, kwargs)` to call `func` with, by the contract above; `TypeError` naming the forms if none fits.

    `context` holds the keywords from the trainer (`trainer_state`, `log_metric`, `log_extra`); missing ones are
    None (the state) or do nothing (the loggers).
    """
    context = {"trainer_state": None, "log_metric": _ignore, "log_extra": _ignore, **(context or {})}
    offered = {"images": images, "prompts": prompts, "completions": images, **context, **columns}
    target = func.forward if isinstance(func, torch.nn.Module) else func  # a module's __call__ hides its forward's
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a callable without a signature (C extension): the positional form
        return (images, prompts), {k: v for k, v in offered.items() if k not in SAMPLE_KEYWORDS}
    kinds = {name: p.kind for name, p in params.items()}
    takes_any = inspect.Parameter.VAR_KEYWORD in kinds.values()
    takes_args = inspect.Parameter.VAR_POSITIONAL in kinds.values()
    required = [n for n, p in params.items() if p.default is p.empty and p.kind in (*_POSITIONAL_KINDS, _KEYWORD_ONLY)]
    positional = [n for n, kind in kinds.items() if kind in _POSITIONAL_KINDS]

    def accepted(values: dict) -> dict:
        return values if takes_any else {k: v for k, v in values.items() if kinds.get(k) in _KEYWORD_KINDS}

    # TRL's keyword form: every required parameter is one of the keywords. A bare `(*args, **kwargs)` wrapper (a
    # decorator without functools.wraps) names none, and keeps the positional form it always had.
    names_samples = any(name in kinds for name in SAMPLE_KEYWORDS)
    if all(n in offered and kinds[n] in _KEYWORD_KINDS for n in required) and (names_samples or not takes_args):
        return (), accepted(offered)
    # The positional form `reward(images, prompts, **columns)`, whatever its first two parameters are called; any
    # other required parameter must be a column or a context keyword.
    slots = positional[:2]
    others_offered = all(
        n in slots or (n not in SAMPLE_KEYWORDS and n in offered and kinds[n] in _KEYWORD_KINDS) for n in required
    )
    if (len(slots) == 2 or takes_args) and others_offered:
        rest = {k: v for k, v in offered.items() if k not in (*SAMPLE_KEYWORDS, *slots)}
        return (images, prompts), accepted(rest)
    raise TypeError(
        f"Reward function {reward_name(func)!r} takes {inspect.signature(target)}, which fits neither form: "
        f"reward(images, prompts, **columns) or, as TRL's rewards, reward(prompts=..., completions=..., "
        f"trainer_state=..., **kwargs) with completions holding the images (docs/rewards.md)."
    )


def is_async_callable(func: Callable) -> bool:
    """Whether calling `func` returns a coroutine: async functions, partials of them, and callables with an async
    `__call__` (TRL's `is_async_callable` rule, kept here because importing `trl.trainer.utils` takes seconds, and the
    reward server must start fast)."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for async rewards, running forever in a daemon thread (started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop, ready = asyncio.new_event_loop(), threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="ddrl-reward-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def _as_score(value, func_name: str, index: int) -> float:
    """One score as a float; NaN (invalid) for None, NaN and ±inf, which no advantage can be computed from."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Reward function {func_name!r} returned {value!r} ({type(value).__name__}) for image {index}; it must "
            f"return one float (or None to skip the image) per image."
        )
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _scores(output, name: str, batch: int) -> list[float]:
    """A reward's output as `batch` floats (NaN for invalid ones); errors name the function and what it must return."""
    if isinstance(output, torch.Tensor):
        output = output.detach().float().cpu().reshape(-1).tolist()
    elif isinstance(output, np.ndarray):
        output = output.reshape(-1).tolist()
    if not isinstance(output, Sequence) or isinstance(output, (str, bytes)):
        raise TypeError(
            f"Reward function {name!r} returned a {type(output).__name__}; it must return a list of {batch} floats "
            "(one per image, None to skip one)."
        )
    if len(output) != batch:
        raise ValueError(
            f"Reward function {name!r} returned {len(output)} scores for {batch} images; it must return exactly one "
            f"float (or None) per image."
        )
    return [_as_score(v, name, i) for i, v in enumerate(output)]


def compute_rewards(
    funcs: Sequence[RewardFunc],
    images: torch.Tensor,
    prompts: list[str],
    columns: dict[str, list],
    context: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Call every reward function on the batch (async ones concurrently) and check what it returns.

    Returns:
        `(B, F)` float32 CPU tensor of scores, NaN where a function returned None, NaN or ±inf.

    Raises:
        ValueError / TypeError naming the function, if it returns the wrong number of scores or a non-number; a
        reward's own exception, with its type, noted with the function's name.
    """
    batch = len(prompts)
    calls = [(reward_name(f), f, call_arguments(f, images, prompts, columns, context)) for f in funcs]

    def note(err: Exception, name: str) -> None:
        err.add_note(f"(raised by reward function {name!r} on a batch of {batch} samples)")  # keeps its type

    async def run_async(pending):
        results = await asyncio.gather(*(f(*a, **k) for _, f, (a, k) in pending), return_exceptions=True)
        return list(results)

    pending = [(i, call) for i, call in enumerate(calls) if is_async_callable(call[1])]
    future = None
    if pending:
        future = asyncio.run_coroutine_threadsafe(run_async([call for _, call in pending]), _event_loop())
    outputs: dict[int, Any] = {}
    try:
        for index, (name, func, (args, kwargs)) in enumerate(calls):
            if not is_async_callable(func):
                try:
                    outputs[index] = func(*args, **kwargs)
                except Exception as err:
                    note(err, name)
                    raise
    finally:
        results = future.result() if future is not None else []
    for (index, (name, _, _)), result in zip(pending, results):
        if isinstance(result, Exception):
            note(result, name)
            raise result
        outputs[index] = result
    scores = torch.empty(batch, len(funcs), dtype=torch.float32)
    for index, (name, _, _) in enumerate(calls):
        scores[:, index] = torch.tensor(_scores(outputs[index], name, batch), dtype=torch.float32)
    return scores.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)  # finite floats beyond float32 too
