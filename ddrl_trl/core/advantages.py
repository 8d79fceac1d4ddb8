"""Rewards → group-relative advantages (ddrl-algorithm.md §3, steps 3–4).

Everything here runs in float32 whatever the training dtype: advantages scale every policy gradient, and bf16's
8-bit mantissa would quantise small reward differences inside a group to zero.
"""

from __future__ import annotations

from typing import Literal

import torch


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of reward functions, r_n = Σ_i w_i · r_i(x_n).

    Args:
        rewards_per_func: `(B, F)` rewards, NaN where a function returned None/NaN for that sample.
        weights: `(F,)` reward weights.

    Returns:
        `(B,)` float32 rewards; NaN for a sample if any function gave it no valid score, so that an invalid sample is
        excluded rather than silently scored on the remaining functions only.
    """
    rewards_per_func = rewards_per_func.float()
    return (rewards_per_func * weights.to(rewards_per_func)).sum(dim=1)


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    reward_clip: float | None = None,
    exp_transform: bool = False,
    advantage_clip: float | None = 5.0,
    std_eps: float = 1e-4,
) -> torch.Tensor:
    """Group-normalised advantages A_n = (r_n − mean_group) / (std_group + ε).

    The group mean approximates the log-partition Z and the group std the temperature β of the DDRL objective
    (ddrl-algorithm.md §2). Steps, in order:

    1. clip rewards to ±`reward_clip`;
    2. replace invalid (NaN) rewards by the mean of the valid rewards of their group, so they get zero advantage
       (a group with no valid reward gets zero advantages);
    3. centre on the group mean; divide by the group's unbiased std (`"group"`, as TRL's GRPOTrainer), by the std of
       the whole batch (`"batch"`) or by nothing (`"none"`), plus `std_eps`;
    4. optionally apply the λ-transform A ← −exp(−A) (`exp_transform`, the code's `exp_reward`);
    5. clamp to ±`advantage_clip`.

    Args:
        rewards: `(B,)` rewards, samples of one group contiguous, `B = groups × num_generations`.
        num_generations: group size N.

    Returns:
        `(B,)` float32 advantages.
    """
    if rewards.ndim != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length is a multiple of num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}."
        )
    rewards = rewards.float()
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)  # NaN stays NaN
    grouped = rewards.view(-1, num_generations)
    valid = ~torch.isnan(grouped)
    n_valid = valid.sum(dim=1, keepdim=True)
    group_mean = torch.where(valid, grouped, 0.0).sum(dim=1, keepdim=True) / n_valid.clamp(min=1)
    grouped = torch.where(valid, grouped, group_mean)
    centred = grouped - group_mean
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + std_eps)
    elif scale_rewards == "batch":
        centred = centred / (grouped.std() + std_eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    advantages = centred.reshape(-1)
    if exp_transform:
        advantages = -torch.exp(-advantages)
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    return advantages
