"""Reward functions: how they are named, resolved from strings, called and checked.

A reward function is any callable returning one score per sample (docs/rewards.md has the contract, `calling.py`
the calling rules), in TRL's keyword form or the positional one:

    reward(prompts=..., completions=..., trainer_state=..., **columns)   # completions: the samples, as images
    reward(images, prompts, **columns)

- `images` / `completions`: float tensor `(B, 3, H, W)` in [0, 1] on the training device (use `to_pil` for PIL
  images); for video pipelines (Wan) it holds videos `(B, F, 3, H, W)`;
- `prompts`: list of `B` prompts; `trainer_state`: the trainer's `TrainerState`;
- `**columns`: every other dataset column (except the reference image), one value per image.

`async def` rewards run concurrently. A reward returns one score per image; `None`, NaN or ±inf marks a sample it
could not score (excluded, and counted in `rewards/<name>/invalid`).

A string names a reward (`resolve_reward`, forms listed in `REWARD_SPEC_HELP`): a built-in (`"brightness"`,
`"jpeg_compressibility"`, `"jpeg_incompressibility"`), an import path (`"package.module:function"` or TRL's
`"package.module.function"`), or a Hub repo id / local folder of a reward model (`"yuvalkirstain/PickScore_v1"`,
`"trl-lib/ddpo-aesthetic-predictor"`, an image classifier), loaded by `load_reward` (`hub.py`). An import path runs
code: take it only from configuration you trust. docs/rewards.md has the formulas.
"""

from __future__ import annotations

import importlib
import os

from .builtin import BUILTIN_REWARDS, brightness, jpeg_compressibility, jpeg_incompressibility, to_pil
from .calling import RESERVED_KEYWORDS, RewardFunc, compute_rewards, reward_name


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
    if os.path.isdir(spec) or "/" in spec or os.sep in spec:  # a local folder, or a Hub id "owner/name"
        from .hub import load_reward  # transformers' processors: imported only for reward models

        return load_reward(spec)
    if "." in spec:  # TRL's "package.module.function"
        module_name, _, attr = spec.rpartition(".")
        return _import_reward(spec, module_name, attr)
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


__all__ = [
    "BUILTIN_REWARDS",
    "RESERVED_KEYWORDS",
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
