"""The paper's reward-hacking signal: the diffusion loss of the model on held-out data, and its ratio to the base
model's on the same seeded draws (> 1.10: hacking, arXiv 2512.04332 §5). `DDRLTrainer.evaluate()` delegates here."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from datasets import Dataset

from .adapters import PipelineAdapter
from .core import diffusion_loss
from .data import DDRLCollator
from .reference import ReferencePolicy
from .rollout import SeededNoise


class HeldOutEvaluator:
    """Held-out diffusion loss of the trained denoiser and of the base model (`ReferencePolicy`), per dataset.

    The base model's loss is measured once per dataset (by fingerprint). With full fine-tuning and no frozen copy the
    base is gone once training starts, so `measure_base` must run before: `DDRLTrainer.train` calls it, also when
    resuming (the checkpoint's weights are loaded later, inside `Trainer.train`).

    Args:
        adapter, sampler: the model family's adapter and SDE sampler (its noising and training target).
        reference: the base model.
        args: the `DDRLConfig` (seed, `eval_noise_draws`, `per_device_eval_batch_size`, `prompt_column`).
        accelerator: splits the samples across processes and gathers the sums.
        autocast: the trainer's mixed-precision context for denoiser calls.
    """

    def __init__(
        self,
        adapter: PipelineAdapter,
        sampler,
        reference: ReferencePolicy,
        args,
        accelerator,
        autocast: Callable[[], AbstractContextManager],
    ):
        self.adapter, self.sampler, self.reference = adapter, sampler, reference
        self.args, self.accelerator, self.autocast = args, accelerator, autocast
        self._base_losses: dict[str, float] = {}

    def measure_base(self, dataset: Dataset) -> None:
        """Measure the base model's held-out loss on `dataset` if not known yet: through the reference policy when it
        is available, else with the denoiser as it is now (which must still be the base)."""
        if dataset._fingerprint not in self._base_losses:
            self._base_losses[dataset._fingerprint] = self.loss(dataset, base=self.reference.available)

    def metrics(self, dataset: Dataset, prefix: str, training_started: bool) -> dict[str, float]:
        """`{prefix}_diffusion_loss` and `{prefix}_diffusion_loss_ratio` (to the base model's) on `dataset`."""
        if dataset._fingerprint not in self._base_losses:
            if training_started and not self.reference.available:
                raise RuntimeError(
                    "The base model's held-out loss was not measured before training; with full fine-tuning call "
                    "evaluate() (or pass eval_dataset to the trainer) before training starts."
                )
            self.measure_base(dataset)
        loss = self.loss(dataset, base=False)
        return {
            f"{prefix}_diffusion_loss": loss,
            f"{prefix}_diffusion_loss_ratio": loss / self._base_losses[dataset._fingerprint],
        }

    @torch.no_grad()
    def loss(self, dataset: Dataset, base: bool) -> float:
        """Mean diffusion loss over `dataset` × `eval_noise_draws`, the samples split across processes.

        Sample i's noise and timesteps come from generators seeded by (seed, i, draw), so the value does not depend on
        the number of processes or the batch size, and the model and the base see the same draws.
        """
        args, sampler, device = self.args, self.sampler, self.accelerator.device
        noise_source = SeededNoise(args.seed, device, args.num_generations)
        predict = self.reference.predict if base else self.adapter.predict
        collate = DDRLCollator(args.prompt_column)
        rows = range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes)
        total = torch.zeros((), device=device)
        for start in range(0, len(rows), args.per_device_eval_batch_size):
            indices = rows[start : start + args.per_device_eval_batch_size]
            batch = collate([dataset[i] for i in indices])
            x0 = batch["ref_latents"].to(device)
            with self.autocast():
                cond = self.adapter.encode_prompts(batch["prompts"])
                for draw in range(args.eval_noise_draws):
                    noise = noise_source.draw_for(f"eval-noise{draw}", indices, tuple(x0.shape[1:]))
                    t = torch.cat(
                        [sampler.sample_timesteps(1, noise_source.generator(f"eval-t{draw}", i)) for i in indices]
                    )
                    output = predict(sampler.add_noise(x0, noise, t), t, cond)
                    total += diffusion_loss(output, sampler.training_target(x0, noise, t)) * len(indices)
        count = torch.tensor(float(len(rows) * args.eval_noise_draws), device=device)
        summed = self.accelerator.gather(torch.stack([total, count])[None]).sum(dim=0)
        return (summed[0] / summed[1]).item()
