"""The paper's reward-hacking signal: the diffusion loss of the model on held-out data, and its ratio to the base
model's on the same seeded draws (> 1.10: hacking, arXiv 2512.04332 §5). `DDRLTrainer.evaluate()` delegates here.

Under classifier-free guidance the policy samples with ε̂ = ε_∅ + w (ε_c − ε_∅), and the conditional model's loss
does not see a drift of the two branches that guidance amplifies (docs/concepts.md): the guided output's loss on the
same draws, against the base model's guided output, is measured too (`*_guided_diffusion_loss_ratio`), from the
same forward (conditional and unconditional rows in one batch)."""

from __future__ import annotations

import torch
from datasets import Dataset

from ..core import diffusion_loss
from ..data import DDRLCollator
from ..step.policy import Policy
from ..step.reference import ReferencePolicy
from ..step.rollout import SeededNoise


class HeldOutEvaluator:
    """Held-out diffusion loss of the trained policy and of the base model (`ReferencePolicy`), per dataset.

    The base model's loss is measured once per dataset (by fingerprint). With full fine-tuning and no frozen copy the
    base is gone once training starts, so `measure_base` must run before: `DDRLTrainer.train` calls it, also when
    resuming (the checkpoint's weights are loaded later, inside `Trainer.train`).

    Args:
        policy: the trained policy (its adapter, its sampler's noising and training target, its guidance).
        reference: the base model.
        args: the `DDRLConfig` (seed, `eval_noise_draws`, `per_device_eval_batch_size`, `prompt_column`).
        accelerator: splits the samples across processes and gathers the sums.
    """

    def __init__(self, policy: Policy, reference: ReferencePolicy, args, accelerator):
        self.policy, self.reference, self.args, self.accelerator = policy, reference, args, accelerator
        self._base_losses: dict[str, dict[str, float]] = {}

    def measure_base(self, dataset: Dataset) -> None:
        """Measure the base model's held-out loss on `dataset` if not known yet: through the reference policy when it
        is available, else with the denoiser as it is now (which must still be the base)."""
        if dataset._fingerprint not in self._base_losses:
            self._base_losses[dataset._fingerprint] = self.loss(dataset, base=self.reference.available)

    def metrics(self, dataset: Dataset, prefix: str, training_started: bool) -> dict[str, float]:
        """`{prefix}_diffusion_loss` and `{prefix}_diffusion_loss_ratio` (to the base model's) on `dataset`; under
        guidance also `{prefix}_guided_diffusion_loss` and `{prefix}_guided_diffusion_loss_ratio`."""
        if dataset._fingerprint not in self._base_losses:
            if training_started and not self.reference.available:
                raise RuntimeError(
                    "The base model's held-out loss was not measured before training; with full fine-tuning call "
                    "evaluate() (or pass eval_dataset to the trainer) before training starts."
                )
            self.measure_base(dataset)
        base = self._base_losses[dataset._fingerprint]
        metrics = {}
        for name, loss in self.loss(dataset, base=False).items():
            metrics[f"{prefix}_{name}"] = loss
            metrics[f"{prefix}_{name}_ratio"] = loss / base[name]
        return metrics

    @torch.no_grad()
    def loss(self, dataset: Dataset, base: bool) -> dict[str, float]:
        """Mean diffusion loss over `dataset` × `eval_noise_draws`, the samples split across processes:
        `{"diffusion_loss": ...}` of the conditional output, and under guidance `"guided_diffusion_loss"` of the
        guided one (`adapter.combine_guidance` at `cfg_scale`) on the same draws.

        Sample i's noise and timesteps come from generators seeded by (seed, i, draw), so the value does not depend on
        the number of processes or the batch size, and the model and the base see the same draws.
        """
        args, sampler, device = self.args, self.policy.sampler, self.accelerator.device
        noise_source = SeededNoise(args.seed, device, args.num_generations)
        policy = self.reference if base else self.policy
        collate = DDRLCollator(args.prompt_column)
        rows = range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes)
        totals = torch.zeros(2, device=device)  # conditional, guided
        for start in range(0, len(rows), args.per_device_eval_batch_size):
            indices = rows[start : start + args.per_device_eval_batch_size]
            batch = collate([dataset[i] for i in indices])
            x0 = batch["ref_latents"].to(device)
            conditions = policy.conditioning(batch["prompts"], batch["columns"])
            for draw in range(args.eval_noise_draws):
                noise = noise_source.draw_for(f"eval-noise{draw}", indices, tuple(x0.shape[1:]))
                t = torch.cat(
                    [sampler.sample_timesteps(1, noise_source.generator(f"eval-t{draw}", i)) for i in indices]
                )
                x_t, target = sampler.add_noise(x0, noise, t), sampler.training_target(x0, noise, t)
                output = policy.forward(x_t, t, conditions)  # under guidance both branches, in one forward
                totals[0] += diffusion_loss(output.conditional, target) * len(indices)
                if self.policy.guided:
                    totals[1] += diffusion_loss(output.policy, target) * len(indices)
        count = torch.tensor([float(len(rows) * args.eval_noise_draws)], device=device)
        summed = self.accelerator.gather(torch.cat([totals, count])[None]).sum(dim=0)
        losses = {"diffusion_loss": (summed[0] / summed[2]).item()}
        if self.policy.guided:
            losses["guided_diffusion_loss"] = (summed[1] / summed[2]).item()
        return losses
