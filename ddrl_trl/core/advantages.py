"""Rewards → group-relative advantages (docs/concepts.md, "One iteration": reward and advantage).

Everything here runs in float32 or wider whatever the training dtype: advantages scale every policy gradient, and
bf16's 8-bit mantissa would quantise small reward differences inside a group to zero. Group statistics are taken in
float64, so that no reward a float32 can hold overflows them.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of reward functions, r_n = Σ_i w_i · r_i(x_n).

    Args:
        rewards_per_func: `(B, F)` rewards, NaN where a function returned None/NaN for that sample.
        weights: `(F,)` reward weights.

    Returns:
        `(B,)` float32 rewards; NaN (or ±inf) for a sample if any function gave it no valid score, so that an invalid
        sample is excluded rather than silently scored on the remaining functions only.
    """
    rewards_per_func = rewards_per_func.float()
    return (rewards_per_func * weights.to(rewards_per_func)).sum(dim=1)


def _filled_groups(rewards: torch.Tensor, num_generations: int, reward_clip: float | None) -> torch.Tensor:
    """`(G, N)` rewards as the advantages use them: clipped to ±`reward_clip`, each invalid (NaN, ±inf) reward
    replaced by the mean of the valid rewards of its group (0 for a group with none)."""
    if rewards.ndim != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length is a multiple of num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}."
        )
    grouped = rewards.double().view(-1, num_generations)  # float64: float32-range rewards cannot overflow a sum
    valid = torch.isfinite(grouped)
    if reward_clip is not None:
        grouped = grouped.clamp(-reward_clip, reward_clip)
    n_valid = valid.sum(dim=1, keepdim=True)
    group_mean = torch.where(valid, grouped, 0.0).sum(dim=1, keepdim=True) / n_valid.clamp(min=1)
    return torch.where(valid, grouped, group_mean)


def group_reward_std(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    reward_clip: float | None = None,
) -> torch.Tensor:
    """`(G,)` the reward std each group's advantages are divided by (before `std_eps`): the group's unbiased std
    (`"group"`, and reported for `"none"`, as TRL's GRPOTrainer does) or the batch's (`"batch"`), of the rewards as
    `group_advantages` uses them (clipped, invalid ones replaced by their group mean)."""
    grouped = _filled_groups(rewards, num_generations, reward_clip)
    if scale_rewards == "batch":
        return grouped.std().expand(grouped.shape[0]).float()
    if scale_rewards not in ("group", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    return grouped.std(dim=1).float()


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
    (docs/concepts.md; the paper's §3). Steps, in order:

    1. clip rewards to ±`reward_clip`;
    2. replace invalid (NaN, ±inf) rewards by the mean of the valid rewards of their group, so they get zero
       advantage (a group with no valid reward gets zero advantages);
    3. centre on the group mean; divide by the group's unbiased std (`"group"`, as TRL's GRPOTrainer), by the std of
       the whole batch (`"batch"`) or by nothing (`"none"`), plus `std_eps` (`group_reward_std`);
    4. optionally apply the λ-transform A ← −exp(−A) (`exp_transform`, the code's `exp_reward`);
    5. clamp to ±`advantage_clip`.

    Args:
        rewards: `(B,)` rewards, samples of one group contiguous, `B = groups × num_generations`.
        num_generations: group size N.

    Returns:
        `(B,)` float32 advantages, finite for any finite float32 rewards.
    """
    grouped = _filled_groups(rewards, num_generations, reward_clip)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards != "none":
        std = group_reward_std(rewards, num_generations, scale_rewards, reward_clip)
        centred = centred / (std[:, None] + std_eps)
    advantages = centred.reshape(-1).float()
    if exp_transform:
        advantages = -torch.exp(-advantages)
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    return advantages


class AggregatedRewards(NamedTuple):
    """The `(B,)` reward the advantages are computed from, the `scale_rewards` / `reward_clip` to compute them with,
    and the weighted sum of the raw rewards (what is logged as `reward`, in either aggregation, as TRL logs it)."""

    rewards: torch.Tensor
    scale_rewards: str
    reward_clip: float | None
    weighted_sum: torch.Tensor


def aggregate_rewards(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
    scale_rewards: Literal["group", "batch", "none"] = "group",
    reward_clip: float | None = None,
) -> AggregatedRewards:
    """Combine several reward functions into the one reward of each sample, as TRL's `multi_objective_aggregation`.

    - `"sum_then_normalize"`: r = Σ_i w_i r_i (`combine_rewards`), then normalised as `scale_rewards` says. A reward on
      a large scale (JPEG bytes) dominates one on a small scale (a probability) whatever the weights.
    - `"normalize_then_sum"`: each reward is first normalised within its group, z_i = (r_i − mean_group) / (std_group
      + ε) (after `reward_clip`), then r = Σ_i w_i z_i, normalised by the batch std (GDPO, as TRL; the authors' code
      averages per-reward advantages alike): every reward counts by its weight, whatever its scale.

    A sample is invalid (NaN) if any function gave it no valid score, in both modes.
    """
    weighted_sum = combine_rewards(rewards_per_func, weights)
    if aggregation == "sum_then_normalize":
        return AggregatedRewards(weighted_sum, scale_rewards, reward_clip, weighted_sum)
    if aggregation != "normalize_then_sum":
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {aggregation!r}."
        )
    per_func = rewards_per_func.float()
    normalised = torch.stack(
        [
            group_advantages(column, num_generations, "group", reward_clip, exp_transform=False, advantage_clip=None)
            for column in per_func.unbind(dim=1)
        ],
        dim=1,
    )
    combined = (normalised * weights.to(normalised)).sum(dim=1)
    combined[~torch.isfinite(per_func).all(dim=1)] = torch.nan
    return AggregatedRewards(combined, "batch", None, weighted_sum)
