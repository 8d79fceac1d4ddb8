"""The terms of the DDRL loss at one trained denoising step (docs/concepts.md, "One iteration": loss).

    loss_j = L_pg + kl_beta · L_kl + data_beta · L_data

Log-densities are reduced by a mean over the non-batch dimensions (the DDPO / Flow-GRPO convention), so their scale
does not depend on the latent size; all of it is computed in float32.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _mean_over_sample_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Per-sample log N(sample; mean, std²), averaged over the non-batch dimensions, in float32.

        log p = mean_d [ −(x_d − μ_d)² / (2σ²) − log σ − ½ log 2π ]

    `std` is a scalar or broadcastable to `sample` and must be > 0 (the last, deterministic step of a sampler is never
    scored).
    """
    sample, mean = sample.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=sample.device)
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _mean_over_sample_dims(log_density)


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss L_pg = mean_n max(−A_n ρ_n, −A_n clip(ρ_n, 1−ε, 1+ε)).

    ρ_n = exp(log p_θ − log p_old). With one optimiser step per rollout batch ρ = 1 up to numerics and the gradient
    is −A ∇log p_θ; the clip only matters if rollouts are reused.

    Returns:
        `(loss, ratio, clipped)`: the scalar loss, the `(B,)` ratios (detached) and a `(B,)` bool mask of samples
        whose ratio left the trust region (for `clip_fraction`).
    """
    advantages = advantages.float()
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    loss = torch.maximum(unclipped, clipped).mean()
    was_clipped = (ratio - 1.0).abs() > epsilon
    return loss, ratio.detach(), was_clipped.detach()


def reverse_kl_loss(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(p_θ ‖ p_ref) of two Gaussian steps with equal std, per dimension, averaged over samples and dimensions.

    L_kl = mean_n mean_d (μ_θ − μ_ref)² / (2σ²)
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    per_sample = _mean_over_sample_dims((mean.float() - ref_mean.float()) ** 2) / (2 * std**2)
    return per_sample.mean()


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The model family's denoising loss: mean_n w_n · mean_d (prediction − target)², in float32.

    With `weights=None` this is the unweighted MSE of diffusers' `train_text_to_image.py` (w_n = 1).
    """
    per_sample = _mean_over_sample_dims((prediction.float() - target.float()) ** 2)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()
