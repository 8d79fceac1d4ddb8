"""How `DDRLTrainer` measures the paper's reward-hacking signal: the diffusion loss of the model on held-out data,
and its ratio to the base model's on the same seeded draws (> 1.10: hacking, arXiv 2512.04332 §5)."""

from __future__ import annotations

import torch
from datasets import Dataset

from .core import diffusion_loss
from .data import DDRLCollator, check_columns
from .rollout import SeededNoise


class HeldOutEvaluationMixin:
    """`evaluate()` for `DDRLTrainer`, and the base model it compares with.

    Needs, from the trainer: `adapter`, `sampler`, `is_lora`, `ref_denoiser`, `_base_eval_loss` (base losses by
    dataset fingerprint) and `_encode`; from `Trainer`: `args`, `accelerator`, `state`, `log` and the callbacks.
    """

    @torch.no_grad()
    def _base_prediction(self, latents, timesteps, cond) -> torch.Tensor:
        """The base model's output: the adapter switched off (LoRA) or the frozen copy (full fine-tuning)."""
        if self.ref_denoiser is not None:
            return self.adapter.predict(latents, timesteps, cond, denoiser=self.ref_denoiser)
        if not self.is_lora:
            raise RuntimeError("The base model is not available: full fine-tuning keeps no copy unless kl_beta > 0.")
        denoiser = self.adapter.denoiser
        denoiser.disable_adapters()
        try:
            return self.adapter.predict(latents, timesteps, cond)
        finally:
            denoiser.enable_adapters()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out diffusion loss and its ratio to the base model's (> 1.10: the paper's reward-hacking signal).

        Each held-out sample's noise and timesteps are seeded by (`args.seed`, its index), identical for the model and
        the base, so the ratio compares the two on the same draws; the samples are split across processes.
        """
        if eval_dataset is None:
            eval_dataset = self.eval_dataset
        elif "ddrl_ref_latents" not in eval_dataset.column_names:
            check_columns(eval_dataset, self.args.prompt_column, self.args.image_column, "evaluation")
            eval_dataset = self._encode(eval_dataset, self.args, "evaluation")
        if eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (held-out prompts with paired reference images).")
        key = eval_dataset._fingerprint
        if key not in self._base_eval_loss:
            if not self.is_lora and self.ref_denoiser is None and self.state.global_step > 0:
                raise RuntimeError(
                    "The base model's held-out loss was not measured before training; with full fine-tuning call "
                    "evaluate() (or pass eval_dataset to the trainer) before training starts."
                )
            has_base = self.is_lora or self.ref_denoiser is not None  # else the weights are still the base's
            self._base_eval_loss[key] = self._held_out_loss(eval_dataset, base=has_base)
        loss = self._held_out_loss(eval_dataset, base=False)
        metrics = {
            f"{metric_key_prefix}_diffusion_loss": loss,
            f"{metric_key_prefix}_diffusion_loss_ratio": loss / self._base_eval_loss[key],
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def train(self, *args, **kwargs):
        """`Trainer.train`, after measuring the base model's held-out loss when nothing else could later (full
        fine-tuning keeps no copy of the base). The denoiser still holds the base weights here, also when resuming:
        `Trainer.train` loads the checkpoint afterwards."""
        if self.eval_dataset is not None and not self.is_lora and self.ref_denoiser is None:
            key = self.eval_dataset._fingerprint
            if key not in self._base_eval_loss:
                self._base_eval_loss[key] = self._held_out_loss(self.eval_dataset, base=False)
        return super().train(*args, **kwargs)

    @torch.no_grad()
    def _held_out_loss(self, dataset: Dataset, base: bool) -> float:
        """Mean diffusion loss over `dataset` × `eval_noise_draws`, the samples split across processes.

        Sample i's noise and timesteps come from generators seeded by (seed, i, draw), so the value does not depend on
        the number of processes or the batch size, and the model and the base see the same draws.
        """
        args, sampler, device = self.args, self.sampler, self.accelerator.device
        noise_source = SeededNoise(args.seed, device, args.num_generations)
        predict = self._base_prediction if base else self.adapter.predict
        collate = DDRLCollator(args.prompt_column)
        rows = range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes)
        total = torch.zeros((), device=device)
        for start in range(0, len(rows), args.per_device_eval_batch_size):
            indices = rows[start : start + args.per_device_eval_batch_size]
            batch = collate([dataset[i] for i in indices])
            x0 = batch["ref_latents"].to(device)
            with self.compute_loss_context_manager():
                cond = self.adapter.encode_prompts(batch["prompts"])
                for draw in range(args.eval_noise_draws):
                    noise = noise_source.draw_for(f"eval-noise{draw}", indices, tuple(x0.shape[1:]))
                    t = torch.cat([sampler.sample_timesteps(1, noise_source.generator(f"eval-t{draw}", i))
                                   for i in indices])  # fmt: skip
                    output = predict(sampler.add_noise(x0, noise, t), t, cond)
                    total += diffusion_loss(output, sampler.training_target(x0, noise, t)) * len(indices)
        count = torch.tensor(float(len(rows) * args.eval_noise_draws), device=device)
        summed = self.accelerator.gather(torch.stack([total, count])[None]).sum(dim=0)
        return (summed[0] / summed[1]).item()
