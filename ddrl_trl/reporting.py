"""What `DDRLTrainer` reports: the held-out evaluation and the validation samples (`evaluate`, `validate`), the
rollout image grids and DDRL's metrics in the logs, and the model card.

A mixin of `DDRLTrainer` (needs its `args`, `state`, `evaluator`, `validator`, `metrics`, `accelerator`, ...); the
measurements themselves live in `evaluation.py` and `validation.py`.
"""

from __future__ import annotations

import logging

import torch

from .data import REF_LATENTS_COLUMN, check_evaluation_dataset
from .model_card import write_model_card
from .tracking import image_grid, log_image_grid
from .validation import save_grid

logger = logging.getLogger(__name__)


class ReportingMixin:
    """Evaluation, validation, logging and the model card of `DDRLTrainer`."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out diffusion loss and its ratio to the base model's (> 1.10: the paper's reward-hacking signal); under
        guidance (`cfg_scale` > 1) also the guided output's (`eval_guided_diffusion_loss_ratio`), which sees the
        drift guidance amplifies.

        Each held-out sample's noise and timesteps are seeded by (`args.seed`, its index), identical for the model and
        the base, so the ratio compares the two on the same draws; the samples are split across processes
        (`evaluation.HeldOutEvaluator`). `eval_dataset` may be raw (prompts and paired images) or already encoded.

        With validation prompts (`validation_prompts`, or the trainer's eval dataset's first rows) it also samples
        them (`validate`): `eval_rewards/<name>`, `eval_diversity`, `eval_diversity_ratio`, and the grid; a validation
        already taken at this step (by `validation_steps` or at the last step) is reused, not sampled again.
        """
        args = self.args
        if eval_dataset is None:
            eval_dataset = self.eval_dataset
        else:  # checked before any encoding (the trainer's own eval_dataset was checked at construction)
            check_evaluation_dataset(eval_dataset, args, self.reference_column)
            if REF_LATENTS_COLUMN not in eval_dataset.column_names:
                eval_dataset = self._encode(eval_dataset, args, "evaluation")
        if eval_dataset is None and self.validator is None:
            raise ValueError(
                "evaluate() needs an eval_dataset (held-out prompts with paired reference images) or "
                "validation_prompts."
            )
        metrics = {}
        if eval_dataset is not None:
            started = self.state.global_step > 0
            metrics.update(self.evaluator.metrics(eval_dataset, metric_key_prefix, training_started=started))
        if self.validator is not None:
            cached = self._last_validation_metrics
            if cached is not None and cached[0] == (self.state.global_step, metric_key_prefix):
                metrics.update(cached[1])  # validated at this step already (validation_steps, the last step)
            else:
                metrics.update(self._validation_metrics(metric_key_prefix))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(args, self.state, self.control, metrics)
        return metrics

    def validate(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample the validation prompts now (fixed seeds, the policy's sampler), score them with the trained and
        the evaluation rewards, measure their diversity; log the metrics and the grid (trackers, tag "validation";
        `output_dir/validation/step-N.png`) and tell the callbacks, as an evaluation does (the hacking monitor acts
        on it). Runs every `validation_steps` steps and at the end of training; `evaluate()` includes it."""
        if self.validator is None:
            raise ValueError(
                "There are no validation prompts: set DDRLConfig.validation_prompts, or pass an eval_dataset."
            )
        metrics = self._validation_metrics(metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _validation_metrics(self, prefix: str) -> dict[str, float]:
        """The validation's metrics; on the main process also its grid (rows: prompts), saved and logged."""
        metrics, result = self.validator.metrics(prefix, self.state)
        step, prompts = self.state.global_step, self.validator.prompts.prompts
        self.last_validation_step = step
        self._last_validation_metrics = ((step, prefix), metrics)
        if self.accelerator.is_main_process:
            grid = image_grid(result.images, cols=self.args.validation_images_per_prompt)
            self.last_validation = (grid, prompts, step, result.images)
            if self.args.should_save:
                save_grid(grid, self.args.output_dir, step)
            log_image_grid(self.callback_handler.callbacks, grid, prompts, step, tag="validation")
        return metrics

    # ------------------------------------------------------------------------------------------------ publishing
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        **kwargs,
    ) -> None:
        """Write the diffusers model card `push_to_hub()` uploads (README.md, samples.png, training_curves.png):
        base model, paper, how to load the weights, rewards, configuration, samples and curves (`model_card.py`).

        Args:
            model_name: the card's title (`push_to_hub` passes the repo's name; default: the output folder's name).
            dataset_name: the reference data's Hub id or name, in the card's metadata and text.
            tags: tags added to the trainer's (`_tag_names`: ddrl, trl, diffusers-training) and the task's.
            license: the license in the card's metadata.
        """
        if kwargs:
            logger.warning("create_model_card: ignoring arguments it does not use: %s", ", ".join(sorted(kwargs)))
        if self.is_world_process_zero():
            tags = [tags] if isinstance(tags, str) else tags
            write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)

    # ------------------------------------------------------------------------------------------------ logging
    def _maybe_log_images(self, images: torch.Tensor, prompts: list[str]) -> None:
        """Every `log_sample_images_steps` steps, a grid of rollout images to the trackers (and the model card)."""
        every = self.args.log_sample_images_steps
        if not every or self.state.global_step % every:
            return
        if self.accelerator.is_main_process:
            n = self.args.num_sample_images
            grid = image_grid(images[:n])
            self.last_samples = (grid, prompts[:n], self.state.global_step)  # for the model card
            log_image_grid(self.callback_handler.callbacks, grid, prompts[:n], self.state.global_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DDRL metrics (`metrics.TrainingMetrics`, averaged since the last log, then over processes) to the
        Trainer's training logs."""
        if not any(key.startswith(("eval_", "hacking/")) for key in logs):  # training logs only
            logs.update(self.metrics.drain(self.accelerator))
            logs["nonfinite_steps"] = float(self.nonfinite_guard.skipped_steps)
        super().log(logs, start_time)
