"""What every SDE sampler shares: a Gaussian step x_next = μ_θ(x) + σ_j z, and its exact log-density."""

from __future__ import annotations

import torch

from ..core.losses import gaussian_log_prob


class GaussianStepSampler:
    """Base of the samplers: subclasses set `timesteps`, `stds`, `is_stochastic`, `num_train_timesteps` and define
    `step_mean`, `sample_timesteps`, `add_noise` and `training_target`; taking and scoring a step is the same for all
    of them."""

    stds: torch.Tensor
    is_stochastic: list[bool]

    def step_mean(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(
        self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take step `step_index`: returns `(next_sample, log_prob)`, both float32; `noise` is z ~ N(0, I)."""
        mean = self.step_mean(model_output, step_index, sample)
        std = self.stds[step_index]
        next_sample = mean + std * noise.float()
        if not self.is_stochastic[step_index]:  # deterministic step: no density to score (never trained)
            return next_sample, torch.zeros(sample.shape[0], device=sample.device)
        return next_sample, gaussian_log_prob(next_sample, mean, std)

    def log_prob(
        self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor, next_sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_θ(next_sample | sample) of step `step_index` and the mean μ_θ, for the policy (and KL) terms."""
        mean = self.step_mean(model_output, step_index, sample)
        return gaussian_log_prob(next_sample, mean, self.stds[step_index]), mean
