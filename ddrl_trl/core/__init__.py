"""Pure, unit-tested math of DDRL: advantages and losses. No model, no trainer state."""

from .advantages import AggregatedRewards, aggregate_rewards, combine_rewards, group_advantages, group_reward_std
from .guidance import combine_guidance, rescale_to_conditional_norm
from .losses import clipped_policy_loss, diffusion_loss, gaussian_log_prob, reverse_kl_loss

__all__ = [
    "AggregatedRewards",
    "aggregate_rewards",
    "clipped_policy_loss",
    "combine_guidance",
    "combine_rewards",
    "diffusion_loss",
    "gaussian_log_prob",
    "group_advantages",
    "group_reward_std",
    "rescale_to_conditional_norm",
    "reverse_kl_loss",
]
