"""The loss of one trained denoising step j of a rollout batch (docs/concepts.md):

    loss_j = L_pg + data_beta · L_data + kl_beta · L_kl

from one denoiser forward of the policy over the rollout states x_j (both guidance branches under `cfg_scale`) and,
with the data term, the groups' noised references (`Policy.forward`'s extra rows). L_pg is the PPO-clipped
policy-gradient loss on the float32 log-probs (`core.clipped_policy_loss`), L_data the family's diffusion loss on
the references (`core.diffusion_loss`), L_kl the closed-form reverse KL to the base model's step
(`core.reverse_kl_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import clipped_policy_loss, diffusion_loss, reverse_kl_loss
from .collector import RolloutBatch
from .data_term import DataTermBatch
from .hooks import emit
from .policy import Conditions, ExtraRows, Policy
from .reference import ReferencePolicy


@dataclass
class StepTerms:
    """The loss of one trained denoising step and its parts (for the metrics)."""

    loss: torch.Tensor
    policy: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    data: torch.Tensor | None = None
    kl: torch.Tensor | None = None


class StepLoss:
    """`loss_j` of a trained step, and its parts.

    Args:
        policy: the trained policy.
        reference: the base model (the KL term, and the adaptive data_beta's paired signal).
        epsilon: the PPO clip range ε.
        kl_beta: the weight of the reverse-KL term (0: none).
        record_data_losses: with the adaptive data_beta, called with the policy's and the base model's weighted data
            losses on the same rows (`DataBetaControl.record`); None otherwise.
    """

    def __init__(
        self,
        policy: Policy,
        reference: ReferencePolicy,
        epsilon: float,
        kl_beta: float,
        record_data_losses: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ):
        self.policy, self.reference, self.epsilon, self.kl_beta = policy, reference, epsilon, kl_beta
        self.record_data_losses = record_data_losses

    def __call__(
        self,
        model: torch.nn.Module,
        batch: RolloutBatch,
        position: int,
        step_index: int,
        data: DataTermBatch | None,
        data_beta: float,
    ) -> StepTerms:
        """`loss_j` at trained step `step_index` (the `position`-th), the policy calling `model` (the accelerator-
        wrapped denoiser); with `data`, the data term weighted by `data_beta`. Observers of the `"step_terms"` hook
        see the terms before the backward."""
        sampler, states = self.policy.sampler, batch.rollout.states
        timestep = sampler.timesteps[step_index].expand(states.shape[0])
        extra = None
        if data is not None:
            data_t = data.timesteps(sampler, position, step_index)
            noised = sampler.add_noise(data.ref_latents, data.noise, data_t)
            extra = ExtraRows(noised, data_t, data.cond(position))
            target = sampler.training_target(data.ref_latents, data.noise, data_t)
        output = self.policy.using(model).forward(states[:, step_index], timestep, batch.row_conditions, extra)
        log_prob, mean = sampler.log_prob(output.policy, step_index, states[:, step_index], states[:, step_index + 1])
        policy, ratio, clipped = clipped_policy_loss(
            log_prob, batch.rollout.log_probs[:, step_index], batch.advantages, self.epsilon
        )
        terms = StepTerms(loss=policy, policy=policy, ratio=ratio, clipped=clipped)
        if data is not None:
            terms.data = diffusion_loss(output.extra, target, data.weights)
            terms.loss = terms.loss + data_beta * terms.data
            if self.record_data_losses is not None:  # the adaptive data_beta's paired signal: the base, same rows
                base_output = self.reference.forward(extra.latents, extra.timesteps, Conditions(extra.cond)).policy
                base = diffusion_loss(base_output, target, data.weights)
                self.record_data_losses(terms.data * len(data.groups), base * len(data.groups))
        if self.kl_beta > 0:
            reference = self.reference.forward(states[:, step_index], timestep, batch.row_conditions).policy
            ref_mean = sampler.step_mean(reference, step_index, states[:, step_index])
            terms.kl = reverse_kl_loss(mean, ref_mean, sampler.stds[step_index])
            terms.loss = terms.loss + self.kl_beta * terms.kl
        emit("step_terms", step_index=step_index, terms=terms)
        return terms
