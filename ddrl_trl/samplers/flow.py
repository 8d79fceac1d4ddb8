"""The Flow-GRPO SDE sampler for rectified-flow models (SD3/3.5, FLUX, Wan), with exact per-step log-probabilities.

A rectified-flow model predicts the velocity v̂ ≈ ε − x0 of x_t = (1 − t) x0 + t ε. Its probability-flow ODE has an
SDE with the same marginals (Flow-GRPO, Liu et al. 2025, eq. 9), discretised with Euler–Maruyama for the step
t → s (Δ = t − s > 0):

    σ_t = a √(t / (1 − t))                                  (noise level; a = `noise_level`, ≈ 0.7)
    μ   = x_t − Δ [ v̂ + σ_t² / (2t) · (x_t + (1 − t) v̂) ]
    x_s = μ + σ_t √Δ z,   z ~ N(0, I)

so each step is a Gaussian N(μ, (σ_t √Δ)²) whose log-density is exact. At t = 1 the ratio t/(1−t) is infinite; as in
Flow-GRPO the first step uses the second sigma in the denominator. The sigmas — the pipeline's own timestep shift,
static (SD3's `shift`) or resolution-dependent (FLUX's `mu`) — come from diffusers' `FlowMatchEulerDiscreteScheduler`
built from the pipeline's scheduler config. The data term uses the same interpolation and the velocity target
ε − x0 of diffusers' SD3/FLUX training scripts. All arithmetic is float32.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .base import GaussianStepSampler


class FlowSDESampler(GaussianStepSampler):
    """A T-step stochastic sampler for rectified-flow models.

    Args:
        scheduler_config: the pipeline's `FlowMatchEulerDiscreteScheduler` config.
        num_inference_steps: T.
        noise_level: a > 0 in σ_t = a √(t/(1−t)) (Flow-GRPO uses 0.7).
        device: where the schedule tensors live.
        mu: the resolution-dependent shift for schedulers with `use_dynamic_shifting` (FLUX), as the pipeline computes it.
    """

    def __init__(
        self,
        scheduler_config,
        num_inference_steps: int,
        noise_level: float = 0.7,
        device: torch.device | str = "cpu",
        mu: float | None = None,
    ):
        if noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for a stochastic sampler with a log-prob, got {noise_level}.")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        #: `(T+1,)` float32 noise levels t_0 = ~1 > … > t_T = 0.
        self.sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        #: `(T,)` model timesteps (t · num_train_timesteps), as the pipeline feeds them to the transformer.
        self.timesteps = scheduler.timesteps.to(device)
        sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]
        denominator = torch.where(sigma >= 1.0, self.sigmas[1], sigma)  # Flow-GRPO's guard at t = 1
        #: `(T,)` σ_t of the SDE.
        self.sde_sigmas = noise_level * torch.sqrt(sigma / (1 - denominator))
        self.deltas = sigma - sigma_next
        #: `(T,)` float32 std of each Gaussian step, σ_t √Δ.
        self.stds = self.sde_sigmas * self.deltas.sqrt()
        self.is_stochastic = [bool(v) for v in (self.stds > 0).tolist()]

    def step_mean(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """μ_θ(x_t) of step `step_index` in float32 (differentiable w.r.t. `model_output`)."""
        v, x = model_output.float(), sample.float()
        t, delta, sde_sigma = self.sigmas[step_index], self.deltas[step_index], self.sde_sigmas[step_index]
        return x - delta * (v + sde_sigma**2 / (2 * t) * (x + (1 - t) * v))

    def _sigma(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        return (timesteps.float() / self.num_train_timesteps).view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t) x0 + t ε with t = timesteps / num_train_timesteps (the rectified-flow interpolation)."""
        sigma = self._sigma(timesteps, x0.ndim)
        return (1 - sigma) * x0.float() + sigma * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity target ε − x0 of diffusers' `train_dreambooth_sd3.py` / `train_dreambooth_flux.py`."""
        return noise.float() - x0.float()
