"""What a run shows of itself: the rollout image grids, the validation's grid and metrics, and DDRL's training
metrics in each training log. `Reporter` keeps the last of each (for the model card and for reuse within a step);
`DDRLTrainer.evaluate`, `validate` and `log` call it, the measurements themselves live in `held_out.py` and
`validation.py`, the card in `model_card.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import TrainerState

from ..step.metrics import TrainingMetrics
from .guards import NonFiniteStepGuard
from .tracking import image_grid, log_image_grid
from .validation import Validator, grid_path, save_grid

logger = logging.getLogger(__name__)


@dataclass
class SampleGrid:
    """A logged grid of rollout samples: the image (rows: prompts), each tile's prompt and the step they train."""

    image: object  # PIL.Image.Image
    prompts: list[str]
    step: int


@dataclass
class ValidationSamples:
    """The last validation's grid (rows: prompts), its prompts, its step and every sample `(P·K, 3, H, W)` on the
    CPU (videos `(P·K, F, 3, H, W)`)."""

    grid: object  # PIL.Image.Image
    prompts: list[str]
    step: int
    images: torch.Tensor


class Reporter:
    """Logs the rollout and validation grids to the trackers (and `output_dir/validation/`), adds DDRL's metrics to
    the training logs, and keeps what the model card shows.

    Args:
        args: the `DDRLConfig` (sample-image cadence, validation images per prompt, `output_dir`).
        accelerator: the process layout (grids are made on the main process) and the metrics' gather.
        callbacks: the trainer's live callback list (the trackers' callbacks receive the grids).
        metrics: the training metrics recorded since the last log.
        nonfinite_guard: counts the skipped optimiser steps, reported in every training log.
    """

    def __init__(
        self, args, accelerator, callbacks: list, metrics: TrainingMetrics, nonfinite_guard: NonFiniteStepGuard
    ):
        self.args, self.accelerator, self.callbacks = args, accelerator, callbacks
        self.metrics, self.nonfinite_guard = metrics, nonfinite_guard
        #: The last logged rollout grid (main process), shown in the model card.
        self.last_samples: SampleGrid | None = None
        #: The last validation (main process), shown in the model card.
        self.last_validation: ValidationSamples | None = None
        #: The step of the last validation, on every process.
        self.last_validation_step: int | None = None
        self._last_validation_metrics: tuple[tuple[int, str], dict[str, float]] | None = None

    def training_metrics(self) -> dict[str, float]:
        """DDRL's metrics for a training log: averaged since the last log, then over processes (docs/metrics.md),
        and the count of skipped non-finite steps."""
        logs = self.metrics.drain(self.accelerator)
        logs["nonfinite_steps"] = float(self.nonfinite_guard.skipped_steps)
        return logs

    def rollout_grid(self, images: torch.Tensor, prompts: list[str], step: int) -> None:
        """A grid of rollout images to the trackers (and the model card) for optimiser steps k, 2k, ...
        (k = `log_sample_images_steps`), tagged with the `step` they train: the step whose training log shows their
        rewards when k is a multiple of `logging_steps`."""
        every = self.args.log_sample_images_steps
        if not every or step % every or not self.accelerator.is_main_process:
            return
        n = self.args.num_sample_images
        grid = image_grid(images[:n], cols=min(n, self.args.num_generations), captions=prompts[:n])
        self.last_samples = SampleGrid(grid, prompts[:n], step)
        log_image_grid(self.callbacks, grid, prompts[:n], step)

    def validated(self, step: int, prefix: str) -> dict[str, float] | None:
        """The metrics of a validation already taken at `step` under `prefix`, or None."""
        cached = self._last_validation_metrics
        return cached[1] if cached is not None and cached[0] == (step, prefix) else None

    def validation(self, validator: Validator, state: TrainerState, prefix: str) -> dict[str, float]:
        """Validate now: the metrics; on the main process also the grid (rows: prompts), saved and logged."""
        metrics, result = validator.metrics(prefix, state)
        step, prompts = state.global_step, validator.prompts.prompts
        self.last_validation_step = step
        self._last_validation_metrics = ((step, prefix), metrics)
        if self.accelerator.is_main_process:
            per_prompt = self.args.validation_images_per_prompt
            grid = image_grid(result.images, cols=per_prompt, captions=[p for p in prompts for _ in range(per_prompt)])
            self.last_validation = ValidationSamples(grid, prompts, step, result.images)
            if self.args.should_save:
                try:
                    save_grid(grid, self.args.output_dir, step)
                except OSError as err:  # a full disk must not abort the run (and lose this step's checkpoint)
                    logger.warning(
                        "Could not write the validation grid %s (%s); training goes on.",
                        grid_path(self.args.output_dir, step),
                        err,
                    )
            log_image_grid(self.callbacks, grid, prompts, step, tag="validation")
        return metrics
