"""Reward functions: how they are named, called and checked.

A reward function is any callable `f(images, prompts, **columns) -> list[float | None]`:

- `images`: float tensor `(B, 3, H, W)` in [0, 1] on the training device (use `to_pil` for PIL images); for video
  pipelines (Wan) it holds videos `(B, F, 3, H, W)`;
- `prompts`: list of `B` prompts;
- `**columns`: every other dataset column (except the reference image), one value per image.

It returns one score per image; `None`, NaN or ±inf marks a sample it could not score (excluded, and counted in
`rewards/<name>/invalid`).

A string names a reward (`resolve_reward`, forms listed in `REWARD_SPEC_HELP`): a built-in (`"brightness"`,
`"jpeg_compressibility"`, `"jpeg_incompressibility"`), an import path (`"package.module:function"` or TRL's
`"package.module.function"`), or a Hub repo id / local folder of a reward model (`"yuvalkirstain/PickScore_v1"`,
`"trl-lib/ddpo-aesthetic-predictor"`, an image classifier), loaded by `load_reward` (`hub.py`). An import path runs
code: take it only from configuration you trust. docs/rewards.md has the formulas.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .builtin import BUILTIN_REWARDS, brightness, jpeg_compressibility, jpeg_incompressibility, to_pil

RewardFunc = Callable[..., Sequence]


def __getattr__(name: str):
    # `load_reward` (hub.py) loads transformers' processors: imported on first use, so that a server of a built-in
    # reward, or `ddrl-trl --help`, starts in seconds.
    if name == "load_reward":
        from .hub import load_reward

        return load_reward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Every form a reward string may take, for `--help` texts and error messages.
REWARD_SPEC_HELP = (
    f"a built-in name ({', '.join(sorted(BUILTIN_REWARDS))}); an import path 'package.module:function' or "
    f"'package.module.function' (TRL's form), which imports and runs that code, so take it only from configuration "
    f"you trust; a local folder of a reward model; or a Hub repo id 'owner/name' of one (CLIP/PickScore, LAION "
    f"aesthetic predictor, image classifier)"
)


def reward_name(func: RewardFunc) -> str:
    """The name a reward function is logged under (`rewards/<name>/mean`)."""
    return getattr(func, "__name__", None) or type(func).__name__


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A callable as is; a string (`REWARD_SPEC_HELP`), tried in this order: a built-in name (`"brightness"`), an
    import path `"package.module:function"`, an existing local folder of a reward model, TRL's dotted import path
    `"package.module.function"` (a string with dots and no "/"), else a Hub repo id `"owner/name"` of a reward model.
    Reward models load with `load_reward`'s defaults (call it yourself for its options).

    An import path imports a module and calls a function in it: it runs code, so it must come from configuration you
    trust (never from a request or an untrusted file)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"A reward must be a callable or a string, got {type(spec).__name__}.")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        return _import_reward(spec, module_name, attr)
    from .hub import load_reward

    if os.path.isdir(spec):
        return load_reward(spec)
    if "." in spec and "/" not in spec and os.sep not in spec:
        module_name, _, attr = spec.rpartition(".")
        return _import_reward(spec, module_name, attr)
    if "/" in spec or os.sep in spec:
        return load_reward(spec)
    raise ValueError(f"Unknown reward {spec!r}. Use a callable, or a string naming {REWARD_SPEC_HELP}.")


def _import_reward(spec: str, module_name: str, attr: str) -> RewardFunc:
    if not module_name or not attr:
        raise ValueError(f"Cannot import reward {spec!r}: use 'package.module:function' or 'package.module.function'.")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"Cannot import reward {spec!r}: {err}. Use 'package.module:function' or 'package.module.function', with "
            f"the package importable (installed, or on PYTHONPATH)."
        ) from err
    if not callable(func):
        raise ValueError(f"Reward {spec!r} is not callable.")
    return func


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


def compute_rewards(
    funcs: Sequence[RewardFunc], images: torch.Tensor, prompts: list[str], columns: dict[str, list]
) -> torch.Tensor:
    """Call every reward function on the batch and check what it returns.

    Returns:
        `(B, F)` float32 CPU tensor of scores, NaN where a function returned None, NaN or ±inf.

    Raises:
        ValueError / TypeError naming the function, if it returns the wrong number of scores or a non-number.
    """
    batch = len(prompts)
    scores = torch.empty(batch, len(funcs), dtype=torch.float32)
    for f_idx, func in enumerate(funcs):
        name = reward_name(func)
        try:
            output = func(images, prompts, **columns)
        except Exception as err:
            err.add_note(f"(raised by reward function {name!r} on a batch of {batch} samples)")  # keeps its type
            raise
        if isinstance(output, torch.Tensor):
            output = output.detach().float().cpu().reshape(-1).tolist()
        elif isinstance(output, np.ndarray):
            output = output.reshape(-1).tolist()
        if not isinstance(output, Sequence) or isinstance(output, (str, bytes)):
            raise TypeError(
                f"Reward function {name!r} returned a {type(output).__name__}; it must return a list of {batch} floats "
                f"(one per image, None to skip one)."
            )
        if len(output) != batch:
            raise ValueError(
                f"Reward function {name!r} returned {len(output)} scores for {batch} images; it must return exactly "
                f"one float (or None) per image."
            )
        scores[:, f_idx] = torch.tensor([_as_score(v, name, i) for i, v in enumerate(output)], dtype=torch.float32)
    return scores.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)  # finite floats beyond float32 too


__all__ = [
    "BUILTIN_REWARDS",
    "REWARD_SPEC_HELP",
    "RewardFunc",
    "brightness",
    "compute_rewards",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "load_reward",
    "resolve_reward",
    "reward_name",
    "to_pil",
]
