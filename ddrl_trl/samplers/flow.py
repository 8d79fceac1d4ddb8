"""The Flow-GRPO SDE sampler for rectified-flow models (SD3/3.5, FLUX, Wan), with exact per-step log-probabilities.

A rectified-flow model predicts the velocity v̂ ≈ ε − x0 of x_t = (1 − t) x0 + t ε. Its probability-flow ODE has an
SDE with the same marginals (Flow-GRPO, Liu et al. 2025, eq. 9), discretised with Euler–Maruyama for the step
t → s (Δ = t − s > 0):

    σ_t = a √(t / (1 − t))                                  (noise level; a = `noise_level`, ≈ 0.7)
    μ   = x_t − Δ [ v̂ + σ_t² / (2t) · (x_t + (1 − t) v̂) ]
    x_s = μ + σ_t √Δ z,   z ~ N(0, I)

so each step is a Gaussian N(μ, (σ_t √Δ)²) whose log-density is exact. At t = 1 the ratio t/(1−t) is infinite; as in
Flow-GRPO the first step (t ≈ 1) uses the second sigma in the denominator.

The noise levels t_0 > … > t_T = 0 are the pipeline's own: its scheduler (`FlowMatchEulerDiscreteScheduler`, or a
multistep scheduler with `use_flow_sigmas`, as Wan ships) computes them with its timestep shift — static (SD3's
`shift`, Wan's `flow_shift`) or resolution-dependent (FLUX's `mu`) — from the base sigmas the pipeline passes. The
data term uses the same interpolation and the velocity target ε − x0 of diffusers' SD3/FLUX training scripts, with
unit weighting. All arithmetic is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .base import GaussianStepSampler


def image_token_shift_mu(scheduler_config, image_tokens: int) -> float:
    """The resolution-dependent shift `mu` that the FLUX.1, Qwen-Image and Z-Image pipelines compute (their
    `calculate_shift`): linear in the number of image tokens, from `base_shift` at `base_image_seq_len` to `max_shift`
    at `max_image_seq_len` of the scheduler config."""
    base_tokens = scheduler_config.get("base_image_seq_len", 256)
    max_tokens = scheduler_config.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return image_tokens * slope + (base_shift - slope * base_tokens)


def pipeline_base_sigmas(scheduler_config, num_inference_steps: int) -> list[float] | None:
    """The unshifted base sigmas FLUX.1, FLUX.2 and Qwen-Image pipelines pass to `set_timesteps`: linspace(1, 1/T, T),
    or None where the scheduler makes its own flow sigmas (`use_flow_sigmas`)."""
    if scheduler_config.get("use_flow_sigmas", False):
        return None
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()


def _fresh_flow_scheduler(scheduler) -> SchedulerMixin:
    """A new scheduler of the pipeline's kind (the pipeline's own instance is never mutated); a bare config is read as
    a `FlowMatchEulerDiscreteScheduler` config."""
    if isinstance(scheduler, SchedulerMixin):
        fresh = type(scheduler).from_config(scheduler.config)
    else:
        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler)
    if not (isinstance(fresh, FlowMatchEulerDiscreteScheduler) or fresh.config.get("use_flow_sigmas", False)):
        raise ValueError(
            f"{type(fresh).__name__} is not a flow-matching scheduler: the rectified-flow sampler needs a "
            f"FlowMatchEulerDiscreteScheduler, or a multistep scheduler with use_flow_sigmas=True. Set the pipeline's "
            f"scheduler to FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)."
        )
    return fresh


class FlowSDESampler(GaussianStepSampler):
    """A T-step stochastic sampler for rectified-flow models.

    Args:
        scheduler: the pipeline's scheduler (or a `FlowMatchEulerDiscreteScheduler` config); only its config is read.
        num_inference_steps: T.
        noise_level: a > 0 in σ_t = a √(t/(1−t)) (Flow-GRPO uses 0.7).
        device: where the schedule tensors live.
        mu: the resolution-dependent shift for schedulers with `use_dynamic_shifting` (FLUX), as the pipeline
            computes it.
        sigmas: the unshifted base sigmas the pipeline passes to `set_timesteps` (FLUX: linspace(1, 1/T, T)); None
            uses the scheduler's default spacing (SD3, Wan).
    """

    def __init__(
        self,
        scheduler,
        num_inference_steps: int,
        noise_level: float = 0.7,
        device: torch.device | str = "cpu",
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ):
        if noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for a stochastic sampler with a log-prob, got {noise_level}.")
        scheduler = _fresh_flow_scheduler(scheduler)
        extra = {"sigmas": list(sigmas)} if sigmas is not None else {}
        scheduler.set_timesteps(num_inference_steps, device=device, mu=mu, **extra)
        self.scheduler, self.mu = scheduler, mu
        self.num_inference_steps = num_inference_steps
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        #: `(T+1,)` float32 noise levels t_0 = ~1 > … > t_T = 0.
        self.sigmas = torch.as_tensor(scheduler.sigmas).to(device=device, dtype=torch.float32)
        #: `(T,)` model timesteps (t · num_train_timesteps), as the pipeline feeds them to the transformer.
        self.timesteps = torch.as_tensor(scheduler.timesteps).to(device=device, dtype=torch.float32)
        sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]
        # Flow-GRPO's guard at t = 1. "≈ 1", because multistep schedulers start at 1 − 1e-6 (their own log guard) or
        # at 1 − 1/1000 (SANA's DPM-Solver at flow_shift 1), which would otherwise give σ ≈ 700 (or 22) at step one.
        denominator = torch.where(sigma >= 1 - 1e-3, self.sigmas[1], sigma)
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

    def shift(self, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep shift applied to base noise levels `t` ∈ (0, 1]: the static
        s·t / (1 + (s − 1) t), or with dynamic shifting the scheduler's `time_shift(mu, 1, t)` (FLUX)."""
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", False):
            return self.scheduler.time_shift(self.mu, 1.0, t)
        s = config.get("shift", None) or config.get("flow_shift", None) or 1.0
        return s * t / (1 + (s - 1) * t)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` random training timesteps: t uniform on (0, 1], shifted like the rollout schedule, times 1000."""
        base = 1 - torch.rand(n, generator=generator, device=generator.device)
        return self.shift(base) * self.num_train_timesteps

    def _sigma(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        return (timesteps.float() / self.num_train_timesteps).view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t) x0 + t ε with t = timesteps / num_train_timesteps (the rectified-flow interpolation)."""
        sigma = self._sigma(timesteps, x0.ndim)
        return (1 - sigma) * x0.float() + sigma * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity target ε − x0 of diffusers' `train_dreambooth_sd3.py` / `train_dreambooth_flux.py`."""
        return noise.float() - x0.float()
