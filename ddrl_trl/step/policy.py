"""The policy DDRL trains: the model family's denoiser driven by its stochastic sampler, with or without
classifier-free guidance (CFG). `Policy` is the one place that knows how the policy is conditioned, how its denoiser
is called and how it samples; the rollout collector, the held-out evaluator and the validator all go through it, and
`ReferencePolicy` offers the same interface over the base weights.

With guidance scale w > 1 the policy samples with

    ε̂_θ(x_t, c) = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) − ε_θ(x_t, ∅))          (Ho & Salimans 2022; diffusers' form)

(ε, v or velocity alike; a family whose pipeline combines the branches otherwise overrides
`PipelineAdapter.combine_guidance`, e.g. Qwen-Image's per-token norm rescale), so the SDE step's mean, its
log-probability and the PPO ratio are those of the guided output, and training back-propagates through both
branches. w = 1 is the unguided policy (one branch, ε_θ(x_t, c)).
The conditional rows, the unconditional rows and any extra rows (the data term's noised references) go through the
denoiser as one batch: one forward per denoising step, whatever the guidance.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from ..adapters import Conditioning, PipelineAdapter, concat_conditioning, repeat_conditioning, select_conditioning
from ..core.guidance import combine_guidance  # noqa: F401  (re-exported: the linear default)
from .rollout import Rollout, SeededNoise


@dataclass
class Conditions:
    """What conditions the policy on a batch of rows: the prompts' conditioning `cond`, and under guidance the
    unconditional branch's `uncond` (None: unguided). `Policy.conditioning` makes them, so whether guidance is on is
    decided there, once; `Policy.forward` guides exactly the rows whose conditions carry `uncond`."""

    cond: Conditioning
    uncond: Conditioning | None = None

    def select(self, rows: slice | torch.Tensor) -> Conditions:
        """The conditions of rows `rows`."""
        uncond = select_conditioning(self.uncond, rows) if self.uncond is not None else None
        return Conditions(select_conditioning(self.cond, rows), uncond)

    def repeat(self, counts: int | Sequence[int]) -> Conditions:
        """Row k repeated `counts` (or `counts[k]`) times: from one row per group to one per rollout."""
        uncond = repeat_conditioning(self.uncond, counts) if self.uncond is not None else None
        return Conditions(repeat_conditioning(self.cond, counts), uncond)


@dataclass
class ExtraRows:
    """Rows that ride along in the policy's denoiser forward without guidance (the data term's noised references)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning


@dataclass
class PolicyOutput:
    """One denoiser forward of the policy.

    Attributes:
        policy: the policy's output for the rows (the guided combination under guidance, else the conditional one).
        conditional: the conditional branch alone (the same tensor as `policy` without guidance).
        extra: the plain output of the `ExtraRows`, or None.
    """

    policy: torch.Tensor
    conditional: torch.Tensor
    extra: torch.Tensor | None = None


class UnconditionalPrompts:
    """The conditioning of the unconditional branch, per group: the fixed `negative_prompt`, the row's
    `negative_prompt_column`, or (neither) the pipeline's own default (`PipelineAdapter.encode_unconditional`).

    The text encoders are frozen, so a fixed negative prompt is encoded once and repeated.

    Args:
        adapter: the model family's adapter.
        negative_prompt: one negative prompt for every row, or None.
        negative_prompt_column: the dataset column holding each row's negative prompt, or None.
        null: the data term's null conditioning instead (`PipelineAdapter.encode_null`, what the family's training
            drops prompts to); then both of the above must be None.
    """

    def __init__(
        self,
        adapter: PipelineAdapter,
        negative_prompt: str | None = None,
        negative_prompt_column: str | None = None,
        null: bool = False,
    ):
        if null and (negative_prompt is not None or negative_prompt_column is not None):
            raise ValueError("The null conditioning takes no negative prompt.")
        self.adapter, self.null = adapter, null
        self.negative_prompt, self.negative_prompt_column = negative_prompt, negative_prompt_column
        self._fixed: Conditioning | None = None

    def for_rows(self, columns: dict[str, list], rows: Sequence[int]) -> Conditioning:
        """The unconditional conditioning of the batch's rows `rows` (indices into `columns`' lists)."""
        if self.negative_prompt_column is not None:
            values = columns[self.negative_prompt_column]
            return self.adapter.encode_unconditional([values[i] for i in rows], len(rows))
        if self._fixed is None:
            if self.null:
                self._fixed = self.adapter.encode_null(1)
            else:
                negatives = None if self.negative_prompt is None else [self.negative_prompt]
                self._fixed = self.adapter.encode_unconditional(negatives, 1)
        return repeat_conditioning(self._fixed, len(rows))


class Policy:
    """The (guided) diffusion policy π_θ: `conditioning` → `forward` / `rollout`.

    Args:
        adapter: the model family's adapter (its denoiser, prompt encoding, decoding, guidance combination).
        sampler: its stochastic sampler (`step` with log-probs).
        latent_shape: one latent sample's shape.
        autocast: the trainer's mixed-precision context, entered around every call of the text encoders and the
            denoiser.
        cfg_scale: the classifier-free guidance scale w; the policy is guided when w > 1.
        unconditional: the guidance's unconditional branch (default: the pipeline's own empty prompt).
        denoiser: the module to call (the accelerator-wrapped denoiser in training, a frozen base copy); None: the
            adapter's denoiser. `using` returns the same policy over another module.
    """

    def __init__(
        self,
        adapter: PipelineAdapter,
        sampler,
        latent_shape: tuple[int, ...],
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        cfg_scale: float = 1.0,
        unconditional: UnconditionalPrompts | None = None,
        denoiser: torch.nn.Module | None = None,
    ):
        self.adapter, self.sampler, self.latent_shape, self.autocast = adapter, sampler, latent_shape, autocast
        self.cfg_scale, self.denoiser = cfg_scale, denoiser
        #: Whether the policy samples with classifier-free guidance: decided here, and nowhere else.
        self.guided = cfg_scale > 1
        self.unconditional = unconditional if unconditional is not None else UnconditionalPrompts(adapter)

    def using(self, denoiser: torch.nn.Module | None) -> Policy:
        """This policy, calling `denoiser` (the conditioning caches are shared)."""
        policy = copy.copy(self)
        policy.denoiser = denoiser
        return policy

    def conditioning(self, prompts: Sequence[str], columns: dict[str, list] | None = None) -> Conditions:
        """The conditions of one row per prompt: the encoded `prompts`, and under guidance the unconditional branch
        (a `negative_prompt_column` is read from `columns`, lists aligned with `prompts`)."""
        with self.autocast():
            cond = self.adapter.encode_prompts(list(prompts))
            uncond = self.unconditional.for_rows(columns or {}, range(len(prompts))) if self.guided else None
        return Conditions(cond, uncond)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: Conditions,
        extra: ExtraRows | None = None,
    ) -> PolicyOutput:
        """The policy's output for `latents` `(b, ...)` at `timesteps` `(b,)`, and the plain output of the `extra`
        rows, from one denoiser forward (`PipelineAdapter.predict`).

        Guided (`conditions.uncond` set): the forward carries `[latents; latents; extra]` with conditioning
        `[cond; uncond; extra.cond]`, and the policy's output is the adapter's `combine_guidance` of the first two
        blocks. Unguided: `[latents; extra]` with `[cond; extra.cond]`.
        """
        rows, guided = latents.shape[0], conditions.uncond is not None
        parts = [(latents, timesteps, conditions.cond)]
        if guided:
            parts.append((latents, timesteps, conditions.uncond))
        if extra is not None:
            parts.append((extra.latents.to(latents.dtype), extra.timesteps, extra.cond))
        joint_cond = parts[0][2]
        for _, _, cond in parts[1:]:
            joint_cond = concat_conditioning(joint_cond, cond)
        with self.autocast():
            output = self.adapter.predict(
                torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), joint_cond, denoiser=self.denoiser
            )
        conditional = output[:rows]
        policy = conditional
        if guided:
            policy = self.adapter.combine_guidance(conditional, output[rows : 2 * rows], self.cfg_scale)
        extra_output = output[(2 if guided else 1) * rows :] if extra is not None else None
        return PolicyOutput(policy, conditional, extra_output)

    @torch.no_grad()
    def rollout(self, conditions: Conditions, noise: SeededNoise, rows: Sequence[int]) -> Rollout:
        """Roll out one sample per global row in `rows`, conditioned by `conditions` (one row each), and decode it.

        Row r's step noise comes from its own generator (`noise`), so the result for a row does not depend on which
        other rows share the batch.
        """
        sampler, latent_shape, batch = self.sampler, self.latent_shape, len(rows)
        # All steps' noise of a row in one draw from its own generator: one call per row, not one per row and step.
        step_noise = noise.draw([noise.generator("steps", r) for r in rows], (len(sampler.timesteps), *latent_shape))
        step_noise = step_noise.transpose(0, 1).contiguous()  # (T, B, ...): each step reads one contiguous block
        latents = noise.initial(rows, latent_shape)
        states, log_probs = [latents], []
        with self.autocast():
            for step_index, timestep in enumerate(sampler.timesteps):
                output = self.forward(latents, timestep.expand(batch), conditions).policy
                latents, log_prob = sampler.step(output, step_index, latents, step_noise[step_index])
                states.append(latents)
                log_probs.append(log_prob)
            images = self.adapter.decode_latents(latents)
        return Rollout(states=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1), images=images)


def drop_conditioning(cond: Conditioning, uncond: Conditioning, dropped: torch.Tensor) -> Conditioning:
    """Row k of `uncond` where `dropped[k]`, else row k of `cond` (the data term's prompt dropout)."""
    out = {}
    for key, value in cond.items():
        replacement = uncond[key]
        if replacement.shape != value.shape:
            raise ValueError(
                f"The unconditional conditioning's {key!r} has shape {tuple(replacement.shape)}, the prompts' "
                f"{tuple(value.shape)}: the adapter's encode_unconditional and encode_null must pad like "
                "encode_prompts."
            )
        mask = dropped.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, replacement.to(value.dtype), value)
    return out
