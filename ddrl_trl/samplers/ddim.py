"""Stochastic DDIM (η > 0) for ε- and v-prediction models, with exact per-step log-probabilities.

DDIM (Song et al., 2021, eq. 12) with η > 0 is a Markov chain of Gaussians, which makes it a policy whose
log-likelihood RL can differentiate (DDPO's `ddim_step_with_logprob`). For the step t → s (s = t − 1000/T):

    x̂0  = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                        (ε-prediction; for v: x̂0 = √ᾱ_t x_t − √(1−ᾱ_t) v̂)
    σ_t = η √((1−ᾱ_s)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)               (eq. 16)
    μ   = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ_t²) ε̂
    x_s = μ + σ_t z,   z ~ N(0, I)

Timesteps and ᾱ come from diffusers' `DDIMScheduler` built from the pipeline's own scheduler config, so spacing,
offsets and the final ᾱ are the ones the model was trained and is sampled with. The same forward process
x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε defines the data term's noising and its ε / v training target.
All arithmetic is float32, whatever dtype the denoiser runs in.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .base import GaussianStepSampler


class DDIMSDESampler(GaussianStepSampler):
    """A T-step stochastic DDIM sampler bound to one scheduler config.

    Args:
        scheduler_config: the pipeline's scheduler config (any scheduler of the DDPM family: DDIM, PNDM, Euler, ...).
        num_inference_steps: T.
        eta: η > 0, the stochasticity; η = 1 gives DDPM's posterior variance.
        device: where the schedule tensors live (the rollout device, so no host round trip in the loop).
    """

    def __init__(self, scheduler_config, num_inference_steps: int, eta: float, device: torch.device | str = "cpu"):
        if eta <= 0:
            raise ValueError(f"eta must be > 0 for a stochastic sampler with a log-prob, got {eta}.")
        scheduler = DDIMScheduler.from_config(scheduler_config)
        if scheduler.config.thresholding:
            raise ValueError("Dynamic thresholding is not supported by the DDIM SDE sampler; set thresholding=False.")
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {scheduler.config.prediction_type!r} is not supported; use 'epsilon' or "
                "'v_prediction'."
            )
        scheduler.set_timesteps(num_inference_steps, device=device)
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.prediction_type = scheduler.config.prediction_type
        self.clip_sample_range = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
        self.num_train_timesteps = scheduler.config.num_train_timesteps

        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.timesteps = scheduler.timesteps.to(device)
        prev_timesteps = self.timesteps - self.num_train_timesteps // num_inference_steps
        final_alpha = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=device, dtype=torch.float32)
        self.alpha_t = self.alphas_cumprod[self.timesteps]
        self.alpha_prev = torch.where(
            prev_timesteps >= 0, self.alphas_cumprod[prev_timesteps.clamp(min=0)], final_alpha
        )
        variance = (1 - self.alpha_prev) / (1 - self.alpha_t) * (1 - self.alpha_t / self.alpha_prev)
        #: `(T,)` float32 std σ_j of each step; 0 only where the step is deterministic (then never scored).
        self.stds = eta * variance.clamp(min=0).sqrt()
        # Decided once on the host, so the sampling loop never waits on the device to ask.
        self.is_stochastic = [bool(v) for v in (self.stds > 0).tolist()]

    # ----------------------------------------------------------------------------------------------- reverse process
    def _x0_and_eps(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor):
        alpha_t = self.alpha_t[step_index]
        model_output, sample = model_output.float(), sample.float()
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        else:  # v-prediction (Salimans & Ho, 2022): v = √ᾱ ε − √(1−ᾱ) x0
            x0 = alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output
            eps = alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def step_mean(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """μ_θ(x_t) of step `step_index` in float32 (differentiable w.r.t. `model_output`)."""
        x0, eps = self._x0_and_eps(model_output, step_index, sample)
        alpha_prev, std = self.alpha_prev[step_index], self.stds[step_index]
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps

    # ----------------------------------------------------------------------------------------------- forward process
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` training timesteps uniform over {0, …, num_train_timesteps − 1}, as diffusers' SD scripts draw them."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=generator.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε for integer training `timesteps` of shape `(B,)`."""
        alpha = self.alphas_cumprod[timesteps].view(-1, *([1] * (x0.ndim - 1)))
        return alpha.sqrt() * x0.float() + (1 - alpha).sqrt() * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target of diffusers' SD training scripts: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        alpha = self.alphas_cumprod[timesteps].view(-1, *([1] * (x0.ndim - 1)))
        return alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * x0.float()
