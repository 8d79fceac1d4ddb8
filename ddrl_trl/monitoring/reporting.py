"""What `DDRLTrainer` reports: the held-out evaluation and the validation samples (`evaluate`, `validate`), the
rollout image grids and DDRL's metrics in the logs, and the model card.

A mixin of `DDRLTrainer` (needs its `args`, `state`, `evaluator`, `validator`, `metrics`, `accelerator`, ...); the
measurements themselves live in `held_out.py` and `validation.py`.
"""

from __future__ import annotations

import logging
import os

import torch

from ..data import REF_LATENTS_COLUMN, check_evaluation_dataset
from .hacking_monitor import HackingMonitorCallback
from .model_card import write_model_card
from .tracking import image_grid, log_image_grid
from .validation import grid_path, save_grid

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
            per_prompt = self.args.validation_images_per_prompt
            grid = image_grid(result.images, cols=per_prompt, captions=[p for p in prompts for _ in range(per_prompt)])
            self.last_validation = (grid, prompts, step, result.images)
            if self.args.should_save:
                try:
                    save_grid(grid, self.args.output_dir, step)
                except OSError as err:  # a full disk must not abort the run (and lose this step's checkpoint)
                    logger.warning(
                        "Could not write the validation grid %s (%s); training goes on.",
                        grid_path(self.args.output_dir, step),
                        err,
                    )
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
        """Write the diffusers model card into `output_dir` (README.md, samples.png, training_curves.png, the
        validation gallery): base model, paper, how to load the weights (from the Hub repo being pushed to, else the
        output folder), rewards, configuration, the hacking monitor's verdict, samples and curves (`model_card.py`).
        The trainer writes it at every checkpoint and at `save_model()`; `push_to_hub()` uploads it.

        Args:
            model_name: the card's title (`push_to_hub` passes the repo's name; default: the output folder's name).
            dataset_name: the reference data's Hub id or name, in the card's metadata and text.
            tags: tags added to the trainer's (`_tag_names`: ddrl, trl, diffusers-training) and the task's.
            license: the license in the card's metadata.

        The arguments given are remembered: the cards written at later saves keep them.
        """
        if kwargs:
            logger.warning("create_model_card: ignoring arguments it does not use: %s", ", ".join(sorted(kwargs)))
        given = dict(model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)
        self.model_card_options.update({key: value for key, value in given.items() if value is not None})
        if self.is_world_process_zero():
            options = dict(self.model_card_options)
            options["tags"] = [options["tags"]] if isinstance(options.get("tags"), str) else options.get("tags")
            write_model_card(self, **options)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; a save into `output_dir` itself also writes the model card there, as TRL does, and a
        save of weights from after the hacking monitor detected hacking says so."""
        if not _internal_call:  # checkpoints say nothing: they are a run's history, not its output
            self._warn_if_saving_hacked_weights(output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)
        target = output_dir if output_dir is not None else self.args.output_dir
        if not _internal_call and os.path.abspath(target) == os.path.abspath(self.args.output_dir):
            self._update_model_card()

    def _warn_if_saving_hacked_weights(self, output_dir: str) -> None:
        """Warn when the weights being saved are from after a `HackingMonitorCallback` detected reward hacking (and
        are not the last good ones), naming the last good weights, so that a hacked model is never saved silently."""
        if not self.is_world_process_zero():
            return
        step = self.restored_step if self.restored_step is not None else self.state.global_step
        for monitor in self.callback_handler.callbacks:
            if not isinstance(monitor, HackingMonitorCallback) or monitor.hacking_step is None:
                continue
            good = monitor.last_good_path
            if good is not None and os.path.abspath(output_dir) == os.path.abspath(good):
                continue  # the monitor saving the last good weights
            if monitor.last_good_step is not None and monitor.last_good_step >= step:
                continue  # these weights are the last good ones
            last_good = (
                f"the last good weights (step {monitor.last_good_step}) are in {good}"
                if monitor.last_good_step is not None and good is not None
                else "no evaluation before it was good, so there are no last good weights"
            )
            logger.warning(
                "Saving to %s the weights of step %d, from after reward hacking was detected at step %d "
                "(HackingMonitorCallback): %s.",
                output_dir,
                self.state.global_step,
                monitor.hacking_step,
                last_good,
            )

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, then the model card in `output_dir` brought up to date (as TRL's trainers do)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self._update_model_card()

    def _update_model_card(self) -> None:
        """`create_model_card` after a save; a card that cannot be written (a full disk, a plotting error) is a
        warning: the weights are saved, and the card is never worth the run."""
        try:
            self.create_model_card()
        except Exception as err:  # noqa: BLE001 — whatever failed, the saved weights stand and training goes on
            logger.warning(
                "Could not write the model card in %s (%s: %s); the weights are saved and training goes on.",
                self.args.output_dir,
                type(err).__name__,
                err,
            )

    # ------------------------------------------------------------------------------------------------ logging
    def _maybe_log_images(self, images: torch.Tensor, prompts: list[str]) -> None:
        """A grid of rollout images to the trackers (and the model card) for optimiser steps k, 2k, ...
        (k = `log_sample_images_steps`), tagged with the step they train: the step whose training log shows their
        rewards when k is a multiple of `logging_steps`."""
        every, step = self.args.log_sample_images_steps, self.state.global_step + 1
        if not every or step % every:
            return
        if self.accelerator.is_main_process:
            n = self.args.num_sample_images
            grid = image_grid(images[:n], cols=min(n, self.args.num_generations), captions=prompts[:n])
            self.last_samples = (grid, prompts[:n], step)  # for the model card
            log_image_grid(self.callback_handler.callbacks, grid, prompts[:n], step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DDRL metrics (`metrics.TrainingMetrics`, averaged since the last log, then over processes) to the
        Trainer's training logs."""
        training = not any(key.startswith(("eval_", "hacking/")) for key in logs)
        if training:
            logs.update(self.metrics.drain(self.accelerator))
            logs["nonfinite_steps"] = float(self.nonfinite_guard.skipped_steps)
        pending_training_log = self.control.should_log
        super().log(logs, start_time)
        if not training:
            # transformers' callback handler clears `should_log` after any `on_log`: a validation or monitor log from
            # inside a step (`on_step_end`) would cancel that step's own training log (loss, reward, grad_norm, lr)
            self.control.should_log = pending_training_log
