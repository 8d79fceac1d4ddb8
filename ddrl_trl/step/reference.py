"""The base model the trained one is compared with: by the reverse-KL term (`kl_beta`), the adaptive data_beta's
signal, the held-out diffusion-loss ratio (`evaluate()`, the hacking monitor) and the validation's base samples."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch

from .policy import Conditions, ExtraRows, Policy, PolicyOutput
from .rollout import Rollout, SeededNoise


class ReferencePolicy:
    """The policy with the base denoiser's weights, with `Policy`'s interface; without a second copy when a LoRA is
    trained.

    - LoRA: the trained denoiser with its adapter switched off for the call.
    - Full fine-tuning: a frozen copy of the denoiser taken now, before training, if `keep_copy` (the KL term needs
      it at every step); without it the base model is gone once training starts (`available` is False), and the
      held-out evaluation and the validation measure the base before training instead.

    Args:
        policy: the trained policy (its adapter's `denoiser` is the trained network).
        is_lora: whether the denoiser carries the trained LoRA.
        keep_copy: with full fine-tuning, keep a frozen copy of the base denoiser in memory.
    """

    def __init__(self, policy: Policy, is_lora: bool, keep_copy: bool):
        self.policy, self.is_lora = policy, is_lora
        self.frozen_copy = None
        if keep_copy and not is_lora:
            self.frozen_copy = copy.deepcopy(policy.adapter.denoiser).requires_grad_(False).eval()

    @property
    def available(self) -> bool:
        """Whether the base model can still be run (always with LoRA; with full fine-tuning only from a copy)."""
        return self.is_lora or self.frozen_copy is not None

    def conditioning(self, prompts: Sequence[str], columns: dict[str, list] | None = None) -> Conditions:
        """As `Policy.conditioning` (the text encoders are frozen: the same for the base)."""
        return self.policy.conditioning(prompts, columns)

    @torch.no_grad()
    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: Conditions,
        extra: ExtraRows | None = None,
    ) -> PolicyOutput:
        """The base model's `Policy.forward`."""
        with self.switched_in() as denoiser:
            return self.policy.using(denoiser).forward(latents, timesteps, conditions, extra)

    @torch.no_grad()
    def rollout(self, conditions: Conditions, noise: SeededNoise, rows: Sequence[int]) -> Rollout:
        """The base model's `Policy.rollout`."""
        with self.switched_in() as denoiser:
            return self.policy.using(denoiser).rollout(conditions, noise, rows)

    @contextlib.contextmanager
    def switched_in(self) -> Iterator[torch.nn.Module]:
        """The base denoiser to call inside the block: the frozen copy, or with LoRA the trained denoiser with its
        adapter switched off until the block ends."""
        if self.frozen_copy is not None:
            yield self.frozen_copy
            return
        if not self.is_lora:
            raise RuntimeError(
                "The base model is not available: full fine-tuning keeps no copy unless kl_beta > 0 or "
                "target_loss_ratio is set."
            )
        denoiser = self.policy.adapter.denoiser
        denoiser.disable_adapters()
        try:
            yield denoiser
        finally:
            denoiser.enable_adapters()
