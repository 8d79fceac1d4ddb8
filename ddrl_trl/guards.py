"""Non-finite numbers never reach the weights: an optimiser step whose loss or gradients hold NaN or ±inf is skipped.

A NaN that reaches an optimiser step turns every trained weight into NaN, and everything after it (the logged loss
included, which `logging_nan_inf_filter` hides) goes on as if nothing happened. `NonFiniteStepGuard` checks, once
per optimiser step, that every loss since the last step and every gradient is finite; if not, it drops the
gradients (the optimiser then leaves the weights and its own state as they were), warns, counts the step, and stops
training with `NonFiniteTrainingError` after `max_consecutive_nonfinite_steps` skipped steps in a row.

Under DeepSpeed the engine applies the update inside the last backward of a rollout batch, so there the check runs
just before that backward, and a non-finite loss stops training at once (nothing is applied, no checkpoint written).
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row, or under DeepSpeed at all."""


class NonFiniteStepGuard(TrainerCallback):
    """Skip optimiser steps with non-finite losses or gradients; stop after `max_in_a_row` of them in a row.

    The trainer calls `record_loss` with every loss it back-propagates (a device-side AND, no host sync); the check
    itself runs in `on_pre_optimizer_step`, once per optimiser step, and its verdict is agreed across processes so
    that all of them skip the same steps.

    Args:
        trainer: the `DDRLTrainer` (for its trainable parameters and accelerator).
        max_in_a_row: skipped steps in a row after which training stops.
    """

    def __init__(self, trainer, max_in_a_row: int):
        self.trainer, self.max_in_a_row = trainer, max_in_a_row
        #: Optimiser steps skipped since `train()` started, and in a row up to the last step.
        self.skipped_steps, self.in_a_row = 0, 0
        #: Whether the last optimiser step was skipped (the EMA does not advance on it).
        self.skipped_last_step = False
        self._losses_finite: torch.Tensor | None = None

    def record_loss(self, loss: torch.Tensor) -> None:
        """Remember whether `loss` is finite, on the device (no host sync in the training loop)."""
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def _all_finite(self, check_gradients: bool) -> bool:
        """True when every recorded loss (and gradient) on every process is finite; resets the recorded losses."""
        device = self.trainer.accelerator.device
        checks = [torch.ones((), dtype=torch.bool, device=device)]
        if self._losses_finite is not None:
            checks.append(self._losses_finite.to(device))
        if check_gradients:
            checks += [torch.isfinite(p.grad).all() for p in self.trainer.trainable_parameters if p.grad is not None]
        self._losses_finite = None
        local = torch.stack(checks).all().float()[None]
        return bool(self.trainer.accelerator.gather(local).min() > 0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled:  # the engine has already stepped (see `check_before_deepspeed_step`)
            return
        if self._all_finite(check_gradients=True):
            self.in_a_row, self.skipped_last_step = 0, False
            return
        for param in self.trainer.trainable_parameters:
            param.grad = None  # torch optimisers skip parameters without a gradient: weights and state unchanged
        self.skipped_steps, self.in_a_row, self.skipped_last_step = self.skipped_steps + 1, self.in_a_row + 1, True
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} optimiser steps in a row (up to step {state.global_step + 1}) had non-finite (NaN or "
                f"infinite) losses or gradients; all were skipped, and training stops so that a diverged run writes "
                f"no more checkpoints. The weights are those of the last finite step. Lower learning_rate, check the "
                f"rewards and reference data for extreme values, or train in float32 instead of fp16."
            )
        logger.warning(
            "Step %d: non-finite (NaN or infinite) loss or gradients; the optimiser step is skipped (weights unchanged; "
            "%d skipped in a row, training stops at %d).", state.global_step + 1, self.in_a_row, self.max_in_a_row,
        )  # fmt: skip

    def check_before_deepspeed_step(self, step: int) -> None:
        """Under DeepSpeed, called just before the backward that makes the engine step: raise if any loss of the
        rollout batch was non-finite, before the update is applied."""
        if not self._all_finite(check_gradients=False):
            raise NonFiniteTrainingError(
                f"Step {step}: a non-finite (NaN or infinite) loss under DeepSpeed, whose engine applies the update "
                f"inside backward, so the step cannot be skipped; training stops before applying it. Lower "
                f"learning_rate, or check the rewards and reference data for extreme values."
            )
