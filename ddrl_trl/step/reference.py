"""The base model the trained one is compared with: by the reverse-KL term (`kl_beta`) and by the held-out
diffusion-loss ratio (`evaluate()`, the hacking monitor)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from ..adapters import Conditioning, PipelineAdapter
from .policy import predict_policy


class ReferencePolicy:
    """The base denoiser's predictions, without a second copy when a LoRA is trained.

    - LoRA: the trained denoiser with its adapter switched off for the forward.
    - Full fine-tuning: a frozen copy of the denoiser taken now, before training, if `keep_copy` (the KL term needs
      it at every step); without it the base model is gone once training starts (`available` is False), and the
      held-out evaluation measures the base before training instead (`evaluation.HeldOutEvaluator`).

    Args:
        adapter: the model family's adapter (its `denoiser` is the trained network).
        is_lora: whether the denoiser carries the trained LoRA.
        keep_copy: with full fine-tuning, keep a frozen copy of the base denoiser in memory.
    """

    def __init__(self, adapter: PipelineAdapter, is_lora: bool, keep_copy: bool):
        self.adapter, self.is_lora = adapter, is_lora
        self.frozen_copy = None
        if keep_copy and not is_lora:
            self.frozen_copy = copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()

    @property
    def available(self) -> bool:
        """Whether the base model can still be run (always with LoRA; with full fine-tuning only from a copy)."""
        return self.is_lora or self.frozen_copy is not None

    @torch.no_grad()
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None = None,
        cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        """The base model's output for `latents` at `timesteps` (as `PipelineAdapter.predict`); guided by
        `cfg_scale` with `uncond`, as the policy (`guidance.predict_policy`)."""
        with self.switched_in() as denoiser:
            return predict_policy(self.adapter, latents, timesteps, cond, uncond, cfg_scale, None, denoiser)[0]

    @contextlib.contextmanager
    def switched_in(self) -> Iterator[torch.nn.Module]:
        """The base denoiser to call inside the block (for a whole sampling): the frozen copy, or with LoRA the
        trained denoiser with its adapter switched off until the block ends."""
        if self.frozen_copy is not None:
            yield self.frozen_copy
            return
        if not self.is_lora:
            raise RuntimeError(
                "The base model is not available: full fine-tuning keeps no copy unless kl_beta > 0 or "
                "target_loss_ratio is set."
            )
        denoiser = self.adapter.denoiser
        denoiser.disable_adapters()
        try:
            yield denoiser
        finally:
            denoiser.enable_adapters()
