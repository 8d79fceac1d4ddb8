"""Classifier-free guidance (CFG) of the policy: the guided denoiser output, both branches in one forward, and the
unconditional (negative-prompt) conditioning.

With guidance scale w the policy samples with

    ε̂_θ(x_t, c) = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) − ε_θ(x_t, ∅))          (Ho & Salimans 2022; diffusers' form)

(ε, v or velocity alike; a family whose pipeline combines the branches otherwise overrides
`PipelineAdapter.combine_guidance`, e.g. Qwen-Image's per-token norm rescale), so the SDE step's mean, its
log-probability and the PPO ratio are those of the guided output, and training back-propagates through both
branches. w = 1 is the unguided policy (one branch, ε_θ(x_t, c)).
The conditional rows, the unconditional rows and any extra rows (the data term's noised references) go through the
denoiser as one batch: one forward per denoising step, whatever the guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..adapters import Conditioning, PipelineAdapter, concat_conditioning, repeat_conditioning
from ..core.guidance import combine_guidance  # noqa: F401  (re-exported: the linear default)


@dataclass
class ExtraRows:
    """Rows that ride along in the policy's denoiser forward without guidance (the data term's noised references)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning


def predict_policy(
    adapter: PipelineAdapter,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    scale: float = 1.0,
    extra: ExtraRows | None = None,
    denoiser: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's output for `latents` `(b, ...)` at `timesteps` `(b,)`, and the plain output of the `extra` rows,
    from one denoiser forward.

    Guided (`uncond` given and `scale` ≠ 1): the forward carries `[latents; latents; extra]` with conditioning
    `[cond; uncond; extra.cond]`, and the policy's output is the adapter's `combine_guidance` of the first two
    blocks. Unguided: `[latents; extra]` with `[cond; extra.cond]`. `denoiser` as in `PipelineAdapter.predict`.
    """
    rows = latents.shape[0]
    guided = uncond is not None and scale != 1.0
    parts_latents, parts_t, parts_cond = [latents], [timesteps], [cond]
    if guided:
        parts_latents.append(latents)
        parts_t.append(timesteps)
        parts_cond.append(uncond)
    if extra is not None:
        parts_latents.append(extra.latents.to(latents.dtype))
        parts_t.append(extra.timesteps)
        parts_cond.append(extra.cond)
    joint_cond = parts_cond[0]
    for part in parts_cond[1:]:
        joint_cond = concat_conditioning(joint_cond, part)
    output = adapter.predict(torch.cat(parts_latents), torch.cat(parts_t), joint_cond, denoiser=denoiser)
    policy = adapter.combine_guidance(output[:rows], output[rows : 2 * rows], scale) if guided else output[:rows]
    extra_output = output[(2 if guided else 1) * rows :] if extra is not None else None
    return policy, extra_output


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
        negative_prompt: str | None,
        negative_prompt_column: str | None,
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
