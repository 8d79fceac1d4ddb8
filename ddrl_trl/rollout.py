"""On-policy group rollouts with the recorded states and float32 log-probs the policy term needs, and their scoring
(optionally overlapped: chunk k is scored in the background while chunk k+1 is rolled out)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from .adapters import Conditioning, PipelineAdapter, repeat_conditioning, select_conditioning


@dataclass
class Rollout:
    """A batch of `B = groups × N` trajectories x_T → x_0 (sampling order: index 0 is pure noise).

    Attributes:
        states: `(B, T+1, *latent)` float32 states; `states[:, j]` is the input of step j, `states[:, j+1]` its output.
        log_probs: `(B, T)` float32 log p_old(x_{j+1} | x_j), mean over latent dimensions.
        images: `(B, 3, H, W)` float32 decoded images in [0, 1].
    """

    states: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor

    @property
    def initial_noise(self) -> torch.Tensor:
        return self.states[:, 0]

    @classmethod
    def concat(cls, parts: list[Rollout]) -> Rollout:
        """One rollout of the rows of `parts`, in order."""
        if len(parts) == 1:
            return parts[0]
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("states", "log_probs", "images")))


@torch.no_grad()
def generate_rollouts(
    adapter: PipelineAdapter,
    sampler,
    cond: Conditioning,
    num_generations: int,
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    same_noise_within_group: bool = False,
    denoiser: torch.nn.Module | None = None,
) -> Rollout:
    """Roll out `num_generations` samples for each of the prompts whose conditioning is `cond` (one row per prompt).

    Classifier-free guidance is off (DDRL's rollouts sample the policy itself). All noise comes from `generator`,
    which lives on the training device, so a rollout is reproducible and never syncs with the host.
    """
    groups = next(iter(cond.values())).shape[0]
    batch = groups * num_generations
    device = generator.device
    cond = repeat_conditioning(cond, num_generations)
    if same_noise_within_group:
        latents = torch.randn((groups, *latent_shape), generator=generator, device=device)
        latents = latents.repeat_interleave(num_generations, dim=0)
    else:
        latents = torch.randn((batch, *latent_shape), generator=generator, device=device)
    states, log_probs = [latents], []
    for step_index, timestep in enumerate(sampler.timesteps):
        model_output = adapter.predict(latents, timestep.expand(batch), cond, denoiser=denoiser)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        latents, log_prob = sampler.step(model_output, step_index, latents, noise)
        states.append(latents)
        log_probs.append(log_prob)
    images = adapter.decode_latents(latents)
    return Rollout(states=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1), images=images)


def rollout_and_score(
    adapter: PipelineAdapter,
    sampler,
    cond: Conditioning,
    num_generations: int,
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    score: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk_groups: int | None = None,
    executor: Executor | None = None,
    same_noise_within_group: bool = False,
    denoiser: torch.nn.Module | None = None,
) -> tuple[Rollout, torch.Tensor]:
    """Roll out every group of `cond` and score the samples: returns `(rollout, scores)`.

    Groups are rolled out `chunk_groups` at a time (None: all at once). `score(images, rows)` gets each chunk's samples
    and their row slice in the batch and returns `(rows, F)` scores. With an `executor`, each chunk is scored there
    while the next one is rolled out, so a slow reward overlaps generation; the results do not depend on it.
    """
    groups = next(iter(cond.values())).shape[0]
    chunk = chunk_groups or groups
    parts, scores = [], []
    for start in range(0, groups, chunk):
        stop = min(start + chunk, groups)
        part = generate_rollouts(
            adapter, sampler, select_conditioning(cond, slice(start, stop)), num_generations, latent_shape, generator,
            same_noise_within_group=same_noise_within_group, denoiser=denoiser,
        )  # fmt: skip
        rows = slice(start * num_generations, stop * num_generations)
        scores.append(executor.submit(score, part.images, rows) if executor is not None else score(part.images, rows))
        parts.append(part)
    if executor is not None:
        scores = [future.result() for future in scores]
    return Rollout.concat(parts), torch.cat(scores)
